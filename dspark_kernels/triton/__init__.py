"""Triton kernels of dspark_kernels.

Each module holds the kernels of one op (``verify_block.py``) or shared device
helpers (``philox.py``: the random stream of docs/randomness.md). Importing this
package imports triton; callers check ``dspark_kernels._backend.triton_available()``
first. On machines without a GPU the kernels run under ``TRITON_INTERPRET=1``
(set it before triton is imported); the interpreter computes bf16 wrongly, so
interpreter tests use fp32 / fp16 only.

Masks: every ``mask=`` of a load / store / atomic is a boolean tensor of the
pointer's shape built from tensor comparisons only. A scalar condition is never
combined with ``&`` into a tensor mask (``(cols < V) & row_ok``): the interpreter
splats the scalar to an int32 array, which Triton 3.9's interpreter rejects
("mask has unsupported dtype"; 3.6 and 3.8 accept it). Fold it into a bound
(``cols < tl.where(row_ok, V, 0)``) or select (``tl.where(row_ok, cols < V, False)``,
which the compiler turns back into the same ``and``). Scalar masks of scalar loads
(``mask=dpos < num_drafts``) are fine. ``python_tests/test_triton_masks.py``
checks this under any Triton version.

Triton versions: the interpreter tests pass with 3.4, 3.6, 3.8 and 3.9;
``.ci/triton_newest.sh`` runs them and the sm_90 AOT compiles under the newest.
The interpreters of 3.4 and 3.6 need numpy < 2.4 (a loop over ``range`` of tensor
bounds converts a one-element array to an int, which numpy 2.4 refuses).
"""
