// logits_argmax for few rows, CUDA C++: out[r] = argmax over v < n_valid of h[r]·W[v] + b[v] (fp32 accumulation,
// ties → lowest index as torch.argmax), never writing logits. Torch-free: raw pointers, strides and a stream behind
// a C ABI (fmlm_logits_argmax below); kernels/_cuda.py builds this file with nvcc and calls it through ctypes.
//
// Reference: fmlm.kernels.reference.logits_argmax_ref; the Triton kernels of kernels/logits_argmax.py compute the
// same function. This one is written for the sampler's batch-1 heads (LM1B B=1: 128 rows, V = 30522, D = 768),
// where the Triton launch is a V-split GEMM plus a second kernel that reduces the splits (run5 profile on an H100,
// 2026-11-27: 24.6 µs + 12.8 µs). Here the last CTA of a row block to finish reduces the splits (a counter per row
// block, the threadFenceReduction pattern), so one launch does both.
//
// Napkin (H100, LM1B B=1): W is 30592×768 bf16 = 47 MB → 16 µs at 2.96 TB/s if every SM streams an equal share;
// 120 CTAs (2 column tiles each) move 393 KB of W each, ~17.5 µs at a 132th of the copy rate. h (128×768) is re-read
// from L2 per column tile (as W's own bytes: L2, not HBM). The MMAs (9.4 GFLOP through mma.sync) are a fraction of
// that. Not measured yet (no GPU in the sessions that wrote it).
//
// Tile: 128 rows × 128 columns per CTA, K in steps of 64 through a 4-stage cp.async ring; 8 warps as 4 (rows) × 2
// (columns), each 32 × 64 = 2 × 8 mma.sync m16n8k16 tiles with fp32 accumulators, operands by ldmatrix (written in
// PTX: the wmma API loads bf16 fragments with generic 32-bit loads instead of LDSM, 4× the instructions of fp16's).
// Per finished column tile each thread takes the best (value, index) of its 16 columns for each of its 4 rows, the
// four threads of a quad (which share rows) exchange theirs, and each keeps a running best per row; the column
// tiles of the grid's x-axis split are contiguous ranges; the comparison (v > best or (v == best and index < best
// index)) makes the result independent of the order partials merge in.
// NaN logits never win (torch.argmax would return the first NaN; the Triton kernels follow neither rule exactly); a
// row whose every value is NaN gets index 0. Written for sm_90 (programmatic dependent launch); cp.async, ldmatrix
// and mma.sync need sm_80, and the ring 144 KiB of shared memory per CTA, which kernels/logits_argmax.py checks
// before calling (consumer GPUs allow ~99 KiB).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <climits>

#include "fmlm_csrc.h"

namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 4, WARPS = 8, THREADS = WARPS * 32;
// shared row pitch in elements: 144 B, a 16-byte multiple (cp.async, ldmatrix rows) whose rows start 4 banks
// apart, so the 8 row addresses of an ldmatrix phase hit 8 distinct 16-byte bank groups
constexpr int LDS = BK + 8;
constexpr int STAGE_ELEMS = (BM + BN) * LDS;
constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * 2;   // 4 × 36864 = 144 KiB

struct Params {
  const void* h;
  const void* w;
  const void* bias;      // null: no bias
  int bias_dtype;        // 0 bf16, 1 fp16, 2 fp32
  int64_t ldh, ldw;      // row strides in elements
  int M, n_valid, D, splits, n_tiles;
  int pdl;               // launched as a programmatic dependent: wait for the predecessor grid before reading h
  int prefetch;          // (with pdl) first ask L2 for this CTA's W rows, which do not depend on the predecessor
  float* part_val;       // (splits, M) when splits > 1
  int* part_idx;
  unsigned* counters;    // one per row block, zero before the launch; the reducing CTA sets it back to zero
  int64_t* out;
};

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int n = pred ? 16 : 0;       // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

__device__ __forceinline__ void zero(float (&acc)[2][8][4]) {
#pragma unroll
  for (int x = 0; x < 2; ++x)
#pragma unroll
    for (int y = 0; y < 8; ++y)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[x][y][e] = 0.0f;
}

// Four 8×8 b16 matrices from shared memory: lanes 8j..8j+7 give the row addresses of matrix j; each lane gets, in
// r[j], matrix j's elements (row lane / 4, columns 2·(lane % 4) and +1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
}

// d += a·b for one m16n8k16 tile: a row-major 16×16 (4 registers), b column-major 16×8 (2), d fp32 16×8 (4:
// rows lane / 4 and +8, columns 2·(lane % 4) and +1).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float bias_at(const void* b, int dtype, int c) {
  if (dtype == 2) return static_cast<const float*>(b)[c];
  if (dtype == 1) return __half2float(static_cast<const __half*>(b)[c]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(b)[c]);
}

// One K step of the A (h rows m0..) and B (W rows n0..) tiles, 16-byte chunks; D % 8 == 0, so a chunk is wholly
// inside or outside the valid region, and the outside ones are zero-filled (they add 0 to every dot product).
template <typename T>
__device__ __forceinline__ void load_stage(const Params& p, T* sA, T* sB, int m0, int n0, int k0) {
  constexpr int CH = BK / 8;
  const T* h = static_cast<const T*>(p.h);
  const T* w = static_cast<const T*>(p.w);
#pragma unroll
  for (int c = threadIdx.x; c < BM * CH; c += THREADS) {
    const int r = c / CH, k = k0 + (c % CH) * 8;
    const bool ok = m0 + r < p.M && k < p.D;
    cp_async16(sA + r * LDS + (c % CH) * 8, ok ? h + (int64_t)(m0 + r) * p.ldh + k : h, ok);
  }
#pragma unroll
  for (int c = threadIdx.x; c < BN * CH; c += THREADS) {
    const int r = c / CH, k = k0 + (c % CH) * 8;
    const bool ok = n0 + r < p.n_valid && k < p.D;
    cp_async16(sB + r * LDS + (c % CH) * 8, ok ? w + (int64_t)(n0 + r) * p.ldw + k : w, ok);
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS, 1) logits_argmax_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float s_val[2][BM];
  __shared__ int s_idx[2][BM];
  __shared__ int s_last;
  T* ring = reinterpret_cast<T*>(smem);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;          // the mma fragments' row group and the lane's place in its quad
  const int wm = warp % 4, wn = warp / 4;
  const int split = blockIdx.x, rb = blockIdx.y, m0 = rb * BM;
  const int t0 = static_cast<int>(static_cast<int64_t>(split) * p.n_tiles / p.splits);
  const int t1 = static_cast<int>(static_cast<int64_t>(split + 1) * p.n_tiles / p.splits);
  const int KT = (p.D + BK - 1) / BK;
  const int steps = (t1 - t0) * KT;     // (column tile, K step) pairs in one flat loop: the ring runs across tiles

#if __CUDA_ARCH__ >= 900
  if (p.pdl) {
    if (p.prefetch) {                  // W rows [t0·BN, t1·BN) ∩ [0, n_valid): one prefetch per 128-byte line
      const int r0 = t0 * BN, nrows = min(t1 * BN, p.n_valid) - r0;
      const int row_bytes = p.D * static_cast<int>(sizeof(T)), lines = (row_bytes + 127) / 128;
      const char* w = static_cast<const char*>(p.w);
      for (int l = threadIdx.x; l < nrows * lines; l += THREADS) {
        // the line's first byte, or the row's last where the row ends inside the line: an address inside W
        const int off = min((l % lines) * 128, row_bytes - 1);
        const char* a = w + static_cast<int64_t>(r0 + l / lines) * p.ldw * sizeof(T) + off;
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(a));
      }
    }
    // every read of h and every write happens after the predecessor grid completed and flushed (PTX ISA:
    // griddepcontrol); then this grid's own dependents may launch
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  }
#endif
  float acc[2][8][4];                  // [row tile x][column tile y][fragment element]
  zero(acc);
  float best_v[2][2];                  // this thread's rows wm·32 + x·16 + hf·8 + g over this warp's column half
  int best_i[2][2];
#pragma unroll
  for (int x = 0; x < 2; ++x)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      best_v[x][hf] = -INFINITY;
      best_i[x][hf] = INT_MAX;
    }

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) {
      T* sA = ring + s * STAGE_ELEMS;
      load_stage<T>(p, sA, sA + BM * LDS, m0, (t0 + s / KT) * BN, (s % KT) * BK);
    }
    cp_async_commit();
  }
  // ldmatrix row addresses: A (row-major, 16 rows × 16 k per x4) lane → row lane % 16, k (lane / 16)·8; B (n-major
  // W rows, two n8 tiles × 16 k per x4) lane → n (lane % 8) + (lane / 16)·8, k ((lane / 8) % 2)·8
  const int a_off = (wm * 32 + lane % 16) * LDS + (lane / 16) * 8;
  const int b_off = (wn * 64 + lane % 8 + (lane / 16) * 8) * LDS + ((lane / 8) % 2) * 8;
  for (int i = 0; i < steps; ++i) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();                   // step i's stage has landed; every warp is done with step i − 1's
    const int nx = i + STAGES - 1;
    if (nx < steps) {
      T* sA = ring + (nx % STAGES) * STAGE_ELEMS;
      load_stage<T>(p, sA, sA + BM * LDS, m0, (t0 + nx / KT) * BN, (nx % KT) * BK);
    }
    cp_async_commit();
    const T* sA = ring + (i % STAGES) * STAGE_ELEMS;
    const T* sB = sA + BM * LDS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[2][4], b[4][4];
#pragma unroll
      for (int x = 0; x < 2; ++x) ldmatrix_x4(a[x], sA + a_off + x * 16 * LDS + kk);
#pragma unroll
      for (int j = 0; j < 4; ++j) ldmatrix_x4(b[j], sB + b_off + j * 16 * LDS + kk);
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int y = 0; y < 8; ++y) mma16816<T>(acc[x][y], a[x], b[y / 2][(y % 2) * 2], b[y / 2][(y % 2) * 2 + 1]);
    }
    if (i % KT == KT - 1) {            // a column tile is finished: fold it into the running best per row
      // this thread's columns: c0 + y·8 + e (y < 8, e < 2), increasing in (y, e)
      const int c0 = (t0 + i / KT) * BN + wn * 64 + 2 * q;
      float bias[8][2];
#pragma unroll
      for (int y = 0; y < 8; ++y)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = c0 + y * 8 + e;
          bias[y][e] = p.bias != nullptr && c < p.n_valid ? bias_at(p.bias, p.bias_dtype, c) : 0.0f;
        }
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float v = -INFINITY;
          int ix = INT_MAX;
#pragma unroll
          for (int y = 0; y < 8; ++y)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = c0 + y * 8 + e;
              const float z = acc[x][y][hf * 2 + e] + bias[y][e];
              // a NaN never wins (and none is kept: a kept NaN could never be replaced)
              if (c < p.n_valid && !isnan(z) && better(z, c, v, ix)) {
                v = z;
                ix = c;
              }
            }
#pragma unroll
          for (int o = 1; o < 4; o <<= 1) {      // the quad's four lanes hold the same row's other columns
            const float ov = __shfl_xor_sync(0xffffffffu, v, o);
            const int oi = __shfl_xor_sync(0xffffffffu, ix, o);
            if (better(ov, oi, v, ix)) {
              v = ov;
              ix = oi;
            }
          }
          if (better(v, ix, best_v[x][hf], best_i[x][hf])) {
            best_v[x][hf] = v;
            best_i[x][hf] = ix;
          }
        }
      zero(acc);
    }
  }
  cp_async_wait<0>();

  // the two column halves of each row, then this split's partial (or the answer, without a split)
  if (q == 0) {
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        s_val[wn][wm * 32 + x * 16 + hf * 8 + g] = best_v[x][hf];
        s_idx[wn][wm * 32 + x * 16 + hf * 8 + g] = best_i[x][hf];
      }
  }
  __syncthreads();
  const int row = m0 + threadIdx.x;
  if (threadIdx.x < BM && row < p.M) {
    float v = s_val[0][threadIdx.x];
    int ix = s_idx[0][threadIdx.x];
    if (better(s_val[1][threadIdx.x], s_idx[1][threadIdx.x], v, ix)) {
      v = s_val[1][threadIdx.x];
      ix = s_idx[1][threadIdx.x];
    }
    if (p.splits == 1) {
      p.out[row] = ix == INT_MAX ? 0 : ix;
    } else {
      p.part_val[static_cast<int64_t>(split) * p.M + row] = v;
      p.part_idx[static_cast<int64_t>(split) * p.M + row] = ix;
    }
  }
  if (p.splits == 1) return;

  // the last CTA of this row block to get here reduces every split's partials
  __threadfence();                     // this CTA's partials are visible device-wide before the count says so
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&p.counters[rb], 1u) == static_cast<unsigned>(p.splits - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // two threads per row, each over every other split (independent loads, unrolled so that they are in flight
  // together), merged through shared memory
  const int r = threadIdx.x % BM, half = threadIdx.x / BM;
  float v = -INFINITY;
  int ix = INT_MAX;
  if (m0 + r < p.M) {
#pragma unroll 8
    for (int s = half; s < p.splits; s += 2) {
      const float sv = __ldcg(p.part_val + static_cast<int64_t>(s) * p.M + m0 + r);
      const int si = __ldcg(p.part_idx + static_cast<int64_t>(s) * p.M + m0 + r);
      if (better(sv, si, v, ix)) {
        v = sv;
        ix = si;
      }
    }
  }
  s_val[half][r] = v;
  s_idx[half][r] = ix;
  __syncthreads();
  if (threadIdx.x < BM && m0 + r < p.M) {
    if (better(s_val[1][r], s_idx[1][r], v, ix)) ix = s_idx[1][r];
    p.out[m0 + r] = ix == INT_MAX ? 0 : ix;
  }
  if (threadIdx.x == 0) p.counters[rb] = 0u;     // ready for the next launch (and the next CUDA-graph replay)
}

// A failed runtime call also leaves the runtime's sticky last error set; clear it so that it is reported once, here,
// and not again by a later launch's check.
int fail(cudaError_t e) {
  (void)cudaGetLastError();
  return static_cast<int>(e);
}

template <typename T>
int launch_on(const Params& p, int row_blocks, cudaStream_t stream) {
  static bool smem_set[64] = {};       // per device: the dynamic shared-memory opt-in (set once, outside capture)
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return fail(e);
  if (dev >= 64 || !smem_set[dev]) {
    e = cudaFuncSetAttribute(logits_argmax_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
    if (e != cudaSuccess) return fail(e);
    if (dev < 64) smem_set[dev] = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.splits, row_blocks);
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = SMEM_BYTES;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.pdl ? 1 : 0;
  e = cudaLaunchKernelEx(&cfg, logits_argmax_kernel<T>, p);
  return e == cudaSuccess ? 0 : fail(e);
}

// This library links its own CUDA runtime: name the caller's device to it rather than trust its current one, and
// leave the calling thread's current device as it was.
template <typename T>
int launch(const Params& p, int row_blocks, int device, cudaStream_t stream) {
  int prev = -1;
  if (device >= 0) {
    cudaError_t e = cudaGetDevice(&prev);
    if (e == cudaSuccess && prev != device) e = cudaSetDevice(device);
    if (e != cudaSuccess) return fail(e);
  }
  const int rc = launch_on<T>(p, row_blocks, stream);
  if (prev >= 0 && prev != device) {
    const cudaError_t e = cudaSetDevice(prev);
    if (e != cudaSuccess && rc == 0) return fail(e);
  }
  return rc;
}

}  // namespace

extern "C" {

// The declarations and their documentation: fmlm_csrc.h.
int fmlm_abi_version(void) { return FMLM_ABI_VERSION; }

// Column splits for M rows: one wave of CTAs (one per SM), as the Triton launcher's policy.
int fmlm_logits_argmax_default_splits(int M, int n_valid, int num_sms) {
  if (M < 1 || n_valid < 1 || num_sms < 1) return 1;
  const int row_blocks = (M + BM - 1) / BM, n_tiles = (n_valid + BN - 1) / BN;
  const int s = num_sms / row_blocks;
  return s < 1 ? 1 : (s > n_tiles ? n_tiles : s);
}

int fmlm_logits_argmax_rows_per_block(void) { return BM; }

// Dynamic shared memory of one CTA (bytes): the compile check reports it beside ptxas's static count.
int fmlm_logits_argmax_smem_bytes(void) { return SMEM_BYTES; }

// dtype 0: bf16, 1: fp16 (h and w). h (M, D) with row stride ldh, w (≥ n_valid, D) with row stride ldw, bias
// (≥ n_valid entries, bias_dtype 0 bf16, 1 fp16, 2 fp32: the engine keeps its head bias in fp32) or null, out (M)
// int64. With splits > 1: part_val / part_idx of splits·M entries and one
// zeroed counter per 128-row block (each launch leaves them zero again); flags: bit 0 launches the kernel as a
// programmatic dependent of the stream's previous kernel (sm_90+: it may start early and waits in griddepcontrol.wait
// before reading h), bit 1 (with bit 0) prefetches the CTA's W rows into L2 before that wait; device: the CUDA
// device of the pointers and the stream (< 0: the current one). Returns 0, an argument error (< 0) or a
// cudaError_t (> 0).
int fmlm_logits_argmax(int dtype, const void* h, long long ldh, const void* w, long long ldw, const void* bias,
                       int bias_dtype, int M, int n_valid, int D, int splits, float* part_val, int* part_idx,
                       unsigned* counters, long long* out, int flags, int device, void* stream) {
  if ((dtype != 0 && dtype != 1) || bias_dtype < 0 || bias_dtype > 2) return FMLM_ERR_DTYPE;
  if (h == nullptr || w == nullptr || out == nullptr) return FMLM_ERR_NULL;
  if (M < 1 || n_valid < 1 || D < 1 || ldh < D || ldw < D) return FMLM_ERR_SHAPE;
  if (D % 8 != 0 || ldh % 8 != 0 || ldw % 8 != 0 || reinterpret_cast<uintptr_t>(h) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(w) % 16 != 0)
    return FMLM_ERR_ALIGN;
  const int n_tiles = (n_valid + BN - 1) / BN, row_blocks = (M + BM - 1) / BM;
  if (splits < 1 || splits > n_tiles || splits > 65535 || row_blocks > 65535) return FMLM_ERR_SPLITS;
  if (splits > 1 && (part_val == nullptr || part_idx == nullptr || counters == nullptr)) return FMLM_ERR_NULL;
  if (static_cast<int64_t>(splits) * M > INT_MAX) return FMLM_ERR_SHAPE;
  if (flags < 0 || flags > 3) return FMLM_ERR_FLAGS;
  Params p{h, w, bias, bias_dtype, ldh, ldw, M, n_valid, D, splits, n_tiles, flags & 1, flags >> 1,
           part_val, part_idx, counters, reinterpret_cast<int64_t*>(out)};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dtype == 0 ? launch<__nv_bfloat16>(p, row_blocks, device, s) : launch<__half>(p, row_blocks, device, s);
}

const char* fmlm_error_string(int code) {
  switch (code) {
    case 0: return "no error";
    case FMLM_ERR_DTYPE: return "dtype must be 0 (bf16) or 1 (fp16), bias_dtype 0, 1 or 2 (fp32)";
    case FMLM_ERR_SHAPE: return "M, n_valid and D must be >= 1, row strides >= D, splits * M < 2^31";
    case FMLM_ERR_ALIGN: return "D and the row strides must be multiples of 8 elements, h and w 16-byte aligned";
    case FMLM_ERR_NULL: return "a required pointer is null (h, w, out; part_val, part_idx, counters when splits > 1)";
    case FMLM_ERR_SPLITS: return "splits must be in [1, ceil(n_valid / 128)] and the grid within 65535 per axis";
    case FMLM_ERR_FLAGS: return "flags must be 0-3 (bit 0: programmatic dependent launch, bit 1: L2 prefetch of W)";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}

}  // extern "C"
