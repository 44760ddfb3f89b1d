// The fixed-width integer types and DSPARK_HD for every torch-free header: from
// <stdint.h> under a host compiler or nvcc, spelled out under NVRTC (which has no
// C library headers).
#pragma once

#if defined(__CUDACC_RTC__)
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned long long uintptr_t;
#else
#include <stdint.h>
#endif

#ifndef DSPARK_HD
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DSPARK_HD __host__ __device__ __forceinline__
#else
#define DSPARK_HD inline
#endif
#endif
