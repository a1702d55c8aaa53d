"""Work done on the nodes, reached through one transport (runs in the launcher and,
as ``python -m distlaunch.nodes.agent``, on every node).

transport (ssh or srun, and ``for_each``: X on every node in parallel), agent (what
runs on a node: probes, private scratch, hashes, cleanup), treesync (code to the nodes
and results back), doctor (node checks), pipinstall (packages on every node), procs
(the one scan for a run's leftover processes).
"""
