/* fmlm csrc: the C ABI of the CUDA C++ kernels in this folder (torch-free: raw pointers, strides, a stream).
 *
 * Build: nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -gencode=arch=compute_90,code=sm_90 -o libfmlm_csrc.so
 *        logits_argmax.cu            (or `fmlm csrc`, which builds and prints the library's path)
 * Link:  -L<dir> -lfmlm_csrc; the CUDA runtime is linked into the library statically.
 * Every function returns 0, an argument error (< 0, checked before any CUDA call) or a cudaError_t (> 0);
 * fmlm_error_string names either. */
#ifndef FMLM_CSRC_H_
#define FMLM_CSRC_H_

#ifdef __cplusplus
extern "C" {
#endif

#define FMLM_ABI_VERSION 1

enum fmlm_error {
  FMLM_ERR_DTYPE = -1,   /* dtype / bias_dtype out of range */
  FMLM_ERR_SHAPE = -2,   /* M, n_valid, D < 1, a row stride < D, splits * M >= 2^31 */
  FMLM_ERR_ALIGN = -3,   /* D or a row stride not a multiple of 8 elements, h or w not 16-byte aligned */
  FMLM_ERR_NULL = -4,    /* a required pointer is null */
  FMLM_ERR_SPLITS = -5,  /* splits outside [1, ceil(n_valid / 128)], or a grid axis above 65535 */
  FMLM_ERR_FLAGS = -6    /* flags outside 0..3 */
};

enum fmlm_dtype { FMLM_BF16 = 0, FMLM_FP16 = 1, FMLM_FP32 = 2 };

enum fmlm_argmax_flags {
  FMLM_ARGMAX_PDL = 1,       /* launch as a programmatic dependent of the stream's previous kernel (sm_90+) */
  FMLM_ARGMAX_PREFETCH = 2   /* with FMLM_ARGMAX_PDL: prefetch the CTA's rows of w into L2 before waiting */
};

int fmlm_abi_version(void);
const char* fmlm_error_string(int code);

/* out[r] = argmax over v < n_valid of h[r]·w[v] + bias[v] (fp32 accumulation; ties → the lowest index; NaN logits
 * never win, a row of NaN gets 0). h: M × D (row stride ldh), w: ≥ n_valid × D (row stride ldw), both of `dtype`
 * (FMLM_BF16 or FMLM_FP16); bias: ≥ n_valid entries of bias_dtype (any fmlm_dtype) or NULL; out: M int64.
 * splits: CTAs along V (fmlm_logits_argmax_default_splits gives one wave); with splits > 1, part_val and part_idx
 * hold splits · M entries each and counters one zero-initialized entry per 128-row block, which every launch
 * leaves at zero (launches sharing counters must be ordered, e.g. on one stream). device: the CUDA device of the
 * pointers and the stream (< 0: the current one); stream: a cudaStream_t (NULL: the legacy default stream). */
int fmlm_logits_argmax(int dtype, const void* h, long long ldh, const void* w, long long ldw, const void* bias,
                       int bias_dtype, int M, int n_valid, int D, int splits, float* part_val, int* part_idx,
                       unsigned* counters, long long* out, int flags, int device, void* stream);
int fmlm_logits_argmax_default_splits(int M, int n_valid, int num_sms);
int fmlm_logits_argmax_rows_per_block(void);
int fmlm_logits_argmax_smem_bytes(void); /* dynamic shared memory per CTA, bytes (the library opts in to it) */

#ifdef __cplusplus
}
#endif

#endif /* FMLM_CSRC_H_ */
