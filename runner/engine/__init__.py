"""The in-process engine: one model, continuous batching of its sequences.

``core.Engine`` owns the loop; around it the scheduler (which sequences run
in the next step, and what it costs), the executor (context, batches,
sampling), delivery (tokens to text, stop strings, events), the prefix cache
(``slots``, ``hostcache``, ``slotfile``) and what a request may carry
(``requests``, ``limits``, ``sampling``, ``grammar``, ``media``, ``lora``).
``requests``, ``limits`` and ``handoff`` load without the binding, so the
process layer's client uses them freely.
"""
