// Host-side argument checks shared by the CPU and CUDA launchers. Every message
// names the op and the argument, says what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define DSPARK_CHECK(cond, op, ...) TORCH_CHECK(cond, op, ": ", __VA_ARGS__)

#define DSPARK_CHECK_DIM(op, t, d)                                                      \
  DSPARK_CHECK((t).dim() == (d), op, #t " must be a " #d "-D tensor, got shape ",     \
               (t).sizes())

#define DSPARK_CHECK_DEVICE(op, t, ref)                                                 \
  DSPARK_CHECK((t).device() == (ref).device(), op, #t " must be on ", (ref).device(), \
               " (like " #ref "), got ", (t).device())

#define DSPARK_CHECK_SIZE(op, t, d, n)                                                  \
  DSPARK_CHECK((t).size(d) == (n), op, #t ".size(" #d ") must be ", (n), ", got ",     \
               (t).size(d), " (shape ", (t).sizes(), ")")

#define DSPARK_CHECK_FLOAT(op, t)                                                       \
  DSPARK_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||    \
                   (t).scalar_type() == at::kBFloat16,                                 \
               op, #t " must be float32, float16 or bfloat16, got ", (t).scalar_type())

#define DSPARK_CHECK_INT(op, t)                                                         \
  DSPARK_CHECK((t).scalar_type() == at::kInt || (t).scalar_type() == at::kLong, op,    \
               #t " must be int32 or int64, got ", (t).scalar_type())
