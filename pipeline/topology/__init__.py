"""The process topology: its plan, its one owner, and what its processes share.

* ``plan``: chain the stages' declared specs and size the shared memory;
* ``owner``: ``Topology``, which spawns, supervises, restarts and stops the workers;
* ``inflight``: the feeder's ledger of inputs in flight and the re-send rules;
* ``messages``, ``transport``, ``shm``: what travels between processes, and how;
* ``batching``: when the inference process runs a batch.
"""
