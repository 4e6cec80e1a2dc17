"""Model files and the devices they load on: GGUF reading, memory estimates,
layer placement, load-time checks, the default model and named models, and
devices across machines (ggml-rpc).
"""
