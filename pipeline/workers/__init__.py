"""The worker processes of the topology: loader, decoders, inference, sink (one role each).

Each wraps stages from ``wanwu.stages`` in a process: sockets, shared memory and
control messages are here, the work itself is in the stages.
"""
