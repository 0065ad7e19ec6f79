"""Parallelism: logical axis rules and constraints (`sharding`), device meshes (`mesh`),
multi-process start-up (`distributed`), and the Pallas kernels under a mesh
(`kernel_sharding`). Models import `sharding` only; the trainer builds the mesh.

This package sits below `kernels/` (docs/architecture.md §3): the kernels run per shard through
`kernel_sharding`, and `kernels.dispatch` reads the active mesh to pick the platform. So nothing
here imports the kernels, the registries or the config: the rules and mesh shape come in as
arguments from the config's owner (the trainer).
"""
