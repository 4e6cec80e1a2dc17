"""The runner process and what talks to it: the wire protocol (ZeroMQ +
MessagePack), the server that drives an engine, the client a parent server
spawns runners with, CURVE/IPC security, the pool of runners, and the chat
rendering and parsing the ``chat`` op uses.  The client side (``client``,
``protocol``, ``security``, ``pool``) never loads the binding.
"""
