"""Parallelism: logical axis rules and constraints (`sharding`), device meshes (`mesh`),
multi-process start-up (`distributed`). Models import `sharding` only; the trainer builds the
mesh."""
