"""What every rank runs: the step record, the model runner and its CUDA graphs, the worker that
holds one rank's model shard and KV pool, and the executor interface the engine steps through.

The engine (bookkeeping on rank 0) and the tensor-parallel machinery (``distributed``) both build
on this layer; neither is imported from here.
"""
