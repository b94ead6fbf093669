"""The TVM backend: the specc IR lowered to Relax with a BlockBuilder (lowering.py), compiled with
tvm.compile for llvm (CPU) and cuda (build.py), and run on torch tensors through DLPack (runtime.py).

Needs apache-tvm (tested with apache-tvm==0.27.0, apache-tvm-ffi==0.1.14.post0); nothing else in
specc imports this package.
"""
