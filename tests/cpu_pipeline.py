"""The CPU compiler settings of the suite. tests/conftest.py compiles every test program without
LLVM's optimisations (`FAST_FLAGS`: most of a small program's compile time, and the suite
compiles hundreds of them to run each briefly). A test whose claim is about the program users
run (bitwise equality of two programs, a tolerance set by the default pipeline's rounding:
it contracts `a*b+c` into one rounding, level 0 does not) compiles with `DEFAULT_CPU_PIPELINE`
(`jax.jit(..., compiler_options=DEFAULT_CPU_PIPELINE)`)."""

FAST_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
DEFAULT_CPU_PIPELINE = {
  "xla_backend_optimization_level": 3,
  "xla_llvm_disable_expensive_passes": False,
}
