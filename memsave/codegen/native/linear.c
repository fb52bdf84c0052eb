/* memsave's CPU kernels for linears whose weight is stored compressed.
 *
 * Every function reads memsave's own stored formats (memsave/ops/: affine, log and vq codes
 * packed by ops/pack.py, n:m and bitmask sparse values) and never builds a whole dense weight:
 *
 *   ms_linear(d, x, M, bias, y)       y (M, N) = x (M, K) @ W^T + bias, for small M (decode):
 *                                     each thread decodes one row of W at a time into a
 *                                     buffer that stays in L1 and dots it with every row of x.
 *   ms_decode(d, r0, r1, out)         rows r0..r1 of W as fp32 (a tile); for large M the
 *                                     caller multiplies tile by tile with the BLAS GEMM.
 *   ms_linear_w8a8(...)               int8 activations x int8 weights, exact int32 sums.
 *
 * The weight is described by a struct ms_weight (mirrored in kernels.py with ctypes). Rows are
 * independent: OpenMP splits them over threads (torch's own libgomp: the same soname, so the
 * same thread pool and torch.set_num_threads applies).
 *
 * Where the CPU has AVX-512 (F, BW, VBMI; VNNI for w8a8) the decoders are vectorized: 16 codes
 * of any width 1..8 are unpacked with one byte permute and one variable shift, log levels are
 * looked up in a 16-entry register table, n:m values pick their activations with a two-source
 * permute, bitmask values are expanded under the mask. Elsewhere the same decoders run as
 * plain C loops (correct everywhere, fast only where the compiler vectorizes them).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI__)
#define MS_AVX512 1
#include <immintrin.h>
#endif

enum { MS_AFFINE = 0, MS_LOG = 1, MS_VQ = 2, MS_NM = 3, MS_BITMASK = 4 };

typedef struct {
  int64_t format;      /* MS_AFFINE, ... */
  int64_t out_features;  /* N */
  int64_t in_features;   /* K */
  int64_t bits;        /* affine/log: code bits; vq: index bits; nm: position bits */
  int64_t group_size;  /* affine/log: weights per group (K for per-channel) */
  int64_t row_bytes;   /* bytes of one packed row (codes, indices or positions) */
  const uint8_t *codes;     /* packed codes / indices / positions; bitmask: the mask */
  const uint16_t *param0;   /* affine: scale; log: log_zmin (fp16, N x G) */
  const uint16_t *param1;   /* affine: offset or NULL; log: step (fp16, N x G) */
  const float *values;      /* nm: (N, Kc) kept values; bitmask: (nnz,) values; fp32 */
  const int64_t *row_start; /* bitmask: first value of each row (N + 1) */
  const uint16_t *codebook; /* vq: (C, dim) fp16 */
  int64_t centroids;        /* vq: C */
  int64_t dim;              /* vq: weights per vector */
  int64_t n, m;             /* nm: n kept of every m */
} ms_weight;

/* ------------------------------------------------------------------------------ scalars */

static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: normalize */
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* Code k of a row packed by ops/pack.py: the row is one little-endian bit stream. */
static inline uint32_t code_at(const uint8_t *row, int64_t bits, int64_t k) {
  int64_t bit = k * bits, byte = bit >> 3;
  int shift = (int)(bit & 7);
  uint32_t w = row[byte];
  if (shift + bits > 8) w |= (uint32_t)row[byte + 1] << 8;
  return (w >> shift) & ((1u << bits) - 1);
}

/* fp32 -> bf16, round to nearest even (what vcvtneps2bf16 does; NaNs stay NaNs). */
static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline int64_t groups_of(const ms_weight *d) {
  return (d->in_features + d->group_size - 1) / d->group_size;
}

#ifdef MS_AVX512
/* ---------------------------------------------------------------------------- AVX-512 */

typedef struct {
  __m512i perm, shift, mask;
  __mmask16 bytes16; /* the bytes 16 codes take */
} unpacker;

/* Lane i of 16 takes the 4 bytes from byte (i*bits)/8 on, shifted right by (i*bits)%8. */
static inline unpacker make_unpacker(int64_t bits) {
  uint8_t perm[64];
  int32_t shift[16];
  for (int i = 0; i < 16; i++) {
    int start = (int)((i * bits) >> 3);
    for (int j = 0; j < 4; j++) perm[4 * i + j] = (uint8_t)(start + j < 16 ? start + j : 15);
    shift[i] = (int32_t)((i * bits) & 7);
  }
  unpacker u;
  u.perm = _mm512_loadu_si512(perm);
  u.shift = _mm512_loadu_si512(shift);
  u.mask = _mm512_set1_epi32((1 << bits) - 1);
  u.bytes16 = (__mmask16)((1u << (2 * bits)) - 1);
  return u;
}

/* Codes k..k+count-1 (count <= 16, k*bits a whole number of bytes) as 16 int32 lanes; lanes
 * past count are 0. Reads only the bytes those codes occupy. */
static inline __m512i unpack16(const unpacker *u, const uint8_t *row, int64_t bits, int64_t k, int count) {
  int nbytes = (int)((count * bits + 7) >> 3);
  __m128i raw = _mm_maskz_loadu_epi8((__mmask16)((1u << nbytes) - 1), row + ((k * bits) >> 3));
  __m512i v = _mm512_permutexvar_epi8(u->perm, _mm512_zextsi128_si512(raw));
  v = _mm512_and_si512(_mm512_srlv_epi32(v, u->shift), u->mask);
  return _mm512_maskz_mov_epi32((__mmask16)((1u << count) - 1), v);
}

/* Codes k..k+15, all inside the row. */
static inline __m512i unpack16_full(const unpacker *u, const uint8_t *row, int64_t bits, int64_t k) {
  __m128i raw = _mm_maskz_loadu_epi8(u->bytes16, row + ((k * bits) >> 3));
  __m512i v = _mm512_permutexvar_epi8(u->perm, _mm512_zextsi128_si512(raw));
  return _mm512_and_si512(_mm512_srlv_epi32(v, u->shift), u->mask);
}

/* exp for 16 lanes (Cephes' expf polynomial, scaled by 2^n): within 2 ulp of expf. */
static inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-103.9f)), _mm512_set1_ps(88.7f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

/* ------------------------------------------------------------------------ row decoders
 * Each writes row r of the weight, K fp32 values, into out. */

static void decode_affine(const ms_weight *d, int64_t r, float *out) {
  const int64_t K = d->in_features, gs = d->group_size, G = groups_of(d), bits = d->bits;
  const uint8_t *row = d->codes + r * d->row_bytes;
  const uint16_t *scale = d->param0 + r * G, *offset = d->param1 ? d->param1 + r * G : NULL;
  const float centre = -(float)(1 << (bits - 1));
#ifdef MS_AVX512
  const int vector = (gs % 8 == 0) || G == 1; /* every group starts on a whole byte */
  unpacker u = make_unpacker(bits);
#endif
  for (int64_t g = 0; g < G; g++) {
    const float s = half_to_float(scale[g]);
    const float m = offset ? half_to_float(offset[g]) : centre * s;
    const int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
    int64_t k = k0;
#ifdef MS_AVX512
    if (vector) {
      const __m512 vs = _mm512_set1_ps(s), vm = _mm512_set1_ps(m);
      for (; k < k1; k += 16) {
        int count = k1 - k < 16 ? (int)(k1 - k) : 16;
        __m512i q = bits == 8 ? _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << count) - 1), row + k))
                              : unpack16(&u, row, bits, k, count);
        __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), vs, vm);
        _mm512_mask_storeu_ps(out + k, (__mmask16)((1u << count) - 1), w);
      }
    }
#endif
    for (; k < k1; k++) out[k] = (float)code_at(row, bits, k) * s + m;
  }
}

static void decode_log(const ms_weight *d, int64_t r, float *out) {
  const int64_t K = d->in_features, gs = d->group_size, G = groups_of(d), bits = d->bits;
  const uint8_t *row = d->codes + r * d->row_bytes;
  const uint16_t *log_zmin = d->param0 + r * G, *step = d->param1 + r * G;
  const uint32_t level_mask = (1u << (bits - 1)) - 1;
#ifdef MS_AVX512
  const int vector = bits <= 4 && ((gs % 8 == 0) || G == 1);
  unpacker u = make_unpacker(bits);
  /* The 16-entry table of a group: code c -> 0 if its level is 0, else
   * (-1)^sign * exp(log_zmin + (level - 1) * step). */
  int32_t lv[16];
  float sg[16];
  for (int c = 0; c < 16; c++) {
    lv[c] = (int32_t)(c & level_mask);
    sg[c] = (c >> (bits - 1)) & 1 ? -1.0f : 1.0f;
  }
  const __m512 level_minus_1 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(lv)), _mm512_set1_ps(1.0f));
  const __m512 signs = _mm512_loadu_ps(sg);
  const __mmask16 nonzero = _mm512_cmpneq_epi32_mask(_mm512_loadu_si512(lv), _mm512_setzero_si512());
#endif
  for (int64_t g = 0; g < G; g++) {
    const float lz = half_to_float(log_zmin[g]), st = half_to_float(step[g]);
    const int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
    int64_t k = k0;
#ifdef MS_AVX512
    if (vector) {
      __m512 arg = _mm512_fmadd_ps(level_minus_1, _mm512_set1_ps(st), _mm512_set1_ps(lz));
      __m512 table = _mm512_maskz_mul_ps(nonzero, exp16(arg), signs);
      for (; k < k1; k += 16) {
        int count = k1 - k < 16 ? (int)(k1 - k) : 16;
        __m512 w = _mm512_permutexvar_ps(unpack16(&u, row, bits, k, count), table);
        _mm512_mask_storeu_ps(out + k, (__mmask16)((1u << count) - 1), w);
      }
    }
#endif
    for (; k < k1; k++) {
      uint32_t c = code_at(row, bits, k), level = c & level_mask;
      float v = level ? expf(lz + (float)(level - 1) * st) : 0.0f;
      out[k] = (c >> (bits - 1)) & 1 ? -v : v;
    }
  }
}

/* vq: centroids copied from the fp32 codebook (made once per call, codebook_fp32), 16 vectors
 * at a time with fixed-size copies the compiler turns into single moves. */
static void decode_vq(const ms_weight *d, const float *codebook, int64_t r, float *out) {
  const int64_t K = d->in_features, dim = d->dim, bits = d->bits;
  const int64_t V = (K + dim - 1) / dim, whole = K / dim;
  const uint8_t *row = d->codes + r * d->row_bytes;
  int64_t v = 0;
  if (bits == 8 && dim == 2)
    for (; v < whole; v++) memcpy(out + 2 * v, codebook + 2 * (int64_t)row[v], 2 * sizeof(float));
  else if (bits == 8 && dim == 4)
    for (; v < whole; v++) memcpy(out + 4 * v, codebook + 4 * (int64_t)row[v], 4 * sizeof(float));
  for (; v < V; v++) {
    const float *c = codebook + (int64_t)code_at(row, bits, v) * dim;
    for (int64_t j = 0; j < dim && v * dim + j < K; j++) out[v * dim + j] = c[j];
  }
}

#ifdef MS_AVX512
/* 16 columns at a time take 8 kept values: the mask of their positions (values are stored in
 * column order, positions ascending within a group), then one expand puts each value at its
 * column and zeros elsewhere (a scatter took 2.6x as long). n, m, bits are constants here. */
static inline __attribute__((always_inline)) int64_t nm_expand(const uint8_t *row, const float *values, int64_t K,
                                                               float *out, const int n, const int m, const int bits) {
  int64_t c = 0, k = 0;
  for (; k + 16 <= K; k += 16, c += 8) {
    uint32_t packed = 0;
    memcpy(&packed, row + ((c * bits) >> 3), (size_t)bits); /* 8 positions: 16 or 24 bits */
    uint32_t keep = 0;
    for (int j = 0; j < 8; j++) keep |= 1u << ((j / n) * m + ((packed >> (j * bits)) & (m - 1)));
    _mm512_storeu_ps(out + k, _mm512_maskz_expand_ps((__mmask16)keep, _mm512_maskz_loadu_ps(0xFF, values + c)));
  }
  return k;
}
#endif

static void decode_nm(const ms_weight *d, int64_t r, float *out) {
  const int64_t K = d->in_features, n = d->n, m = d->m, kc = K / m * n, bits = d->bits;
  const float *values = d->values + r * kc;
  const uint8_t *row = d->codes + r * d->row_bytes;
  int64_t k = 0;
#ifdef MS_AVX512
  if (n == 2 && m == 4) k = nm_expand(row, values, K, out, 2, 4, 2);
  else if (n == 4 && m == 8) k = nm_expand(row, values, K, out, 4, 8, 3);
#endif
  if (k < K) memset(out + k, 0, (size_t)(K - k) * sizeof(float));
  for (int64_t c = k / m * n; c < kc; c++) out[c / n * m + code_at(row, bits, c)] = values[c];
}

static void decode_bitmask(const ms_weight *d, int64_t r, float *out) {
  const int64_t K = d->in_features;
  const uint8_t *mask = d->codes + r * d->row_bytes;
  const float *values = d->values + d->row_start[r];
  int64_t k = 0;
#ifdef MS_AVX512
  for (; k + 16 <= K; k += 16) {
    __mmask16 keep = (__mmask16)(mask[k >> 3] | (mask[(k >> 3) + 1] << 8));
    int kept = __builtin_popcount(keep);
    __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << kept) - 1), values);
    _mm512_storeu_ps(out + k, _mm512_maskz_expand_ps(keep, v));
    values += kept;
  }
#endif
  for (; k < K; k++) out[k] = (mask[k >> 3] >> (k & 7)) & 1 ? *values++ : 0.0f;
}

static float *codebook_fp32(const ms_weight *d) {
  if (d->format != MS_VQ) return NULL;
  float *cb = malloc((size_t)(d->centroids * d->dim + 16) * sizeof(float));
  for (int64_t i = 0; i < d->centroids * d->dim; i++) cb[i] = half_to_float(d->codebook[i]);
  return cb;
}

static void decode_row(const ms_weight *d, const float *codebook, int64_t r, float *out) {
  switch (d->format) {
    case MS_AFFINE: decode_affine(d, r, out); break;
    case MS_LOG: decode_log(d, r, out); break;
    case MS_VQ: decode_vq(d, codebook, r, out); break;
    case MS_NM: decode_nm(d, r, out); break;
    default: decode_bitmask(d, r, out); break;
  }
}

/* ------------------------------------------------------------------------- products */

static inline float dot(const float *a, const float *b, int64_t K) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < K; k++) acc += a[k] * b[k];
  return acc;
}

/* What every thread reads besides the weight, made once per call. */
typedef struct {
  const float *x;  /* (M, K) activations */
  float *xd;       /* (M, Kp) the same, deinterleaved by `spread` in blocks of 16*spread, zero-padded */
  int64_t Kp, spread;
  float *xsum;     /* affine: (M, G) sums of x over each group */
  float *codebook; /* vq: the codebook in fp32 */
  uint16_t *xb;    /* narrowed: (M, Kp) bf16 activations, deinterleaved by spread in blocks of 32*spread */
#ifdef MS_AVX512
  unpacker u; /* the byte permute and shifts for this weight's code width, made once per call */
#endif
} ms_prep;

#define MB_MAX 8

/* Below this many weights (times activation rows) a call runs on one thread: forking costs a few
 * microseconds, and on a busy machine a region waits for every one of its threads to be
 * scheduled (a 512 x 1408 linear took 30x longer forked than serial with another process on
 * one of the two cores). torch's own kernels have a grain size for the same reason. */
#define PARALLEL_MIN_WORK (1 << 20)

#ifdef MS_AVX512
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

static inline __mmask16 first(int64_t count) {
  return count >= 16 ? (__mmask16)0xFFFF : count <= 0 ? (__mmask16)0 : (__mmask16)((1u << count) - 1);
}

/* Which fused path a weight takes; 0: decode the row into a buffer and dot it. */
enum { F_DECODE = 0, F_AFFINE8, F_AFFINE_SPREAD, F_AFFINE, F_LOG_SPREAD, F_LOG, F_VQ, F_NM, F_BITMASK, F_AFFINE_BF16, F_LOG_BF16,
       F_AFFINE4_BF16 };

/* Codes of 2 or 4 bits come 8/bits to a byte; 16 bytes widened to 16 int32 lanes hold
 * 16*(8/bits) codes, plane p (the bits p*bits..) being codes p, p + 8/bits, ... of the block.
 * Those planes multiply x deinterleaved the same way (see deinterleave). */
static inline int64_t spread_of(int64_t bits) { return bits == 2 || bits == 4 ? 8 / bits : 0; }

#ifdef __AVX512BF16__
#define MS_BF16 1
#endif

/* Narrowed decode (bf16 activations and weights, fp32 sums: vdpbf16ps) for 2- and 4-bit affine
 * and log codes whose groups hold whole blocks of 32 bytes of codes. */
static int bf16_path(const ms_weight *d) {
#ifdef MS_BF16
  const int64_t G = groups_of(d), gs = d->group_size;
  /* int4 affine in whole blocks of 128 codes whose groups tile them: scale after the sums */
  if (d->format == MS_AFFINE && d->bits == 4 && d->in_features % 128 == 0 && (gs == 32 || gs == 64 || gs % 128 == 0))
    return F_AFFINE4_BF16;
  if ((d->format == MS_AFFINE || d->format == MS_LOG) && (d->bits == 2 || d->bits == 4) &&
      (gs % (32 * spread_of(d->bits)) == 0 || G == 1))
    return d->format == MS_AFFINE ? F_AFFINE_BF16 : F_LOG_BF16;
#else
  (void)d;
#endif
  return F_DECODE;
}

static int fused_path(const ms_weight *d, int narrow) {
  const int64_t G = d->format <= MS_LOG ? groups_of(d) : 1, gs = d->group_size;
  if (narrow && bf16_path(d) != F_DECODE) return bf16_path(d);
  switch (d->format) {
    case MS_AFFINE:
      if (d->bits == 8 && (gs % 16 == 0 || G == 1)) return F_AFFINE8;
      if (spread_of(d->bits) && (gs % (16 * spread_of(d->bits)) == 0 || G == 1)) return F_AFFINE_SPREAD;
      return gs % 8 == 0 || G == 1 ? F_AFFINE : F_DECODE;
    case MS_LOG:
      if (spread_of(d->bits) && (gs % (16 * spread_of(d->bits)) == 0 || G == 1)) return F_LOG_SPREAD;
      return d->bits <= 4 && (gs % 8 == 0 || G == 1) ? F_LOG : F_DECODE;
    case MS_VQ: return F_VQ;
    case MS_NM: return (d->n == 2 && d->m == 4) || (d->n == 4 && d->m == 8) ? F_NM : F_DECODE;
    default: return F_BITMASK;
  }
}

/* The fused rows: acc[i] = row r of W . x[i0 + i] for i < MB (MB a constant after inlining,
 * so the accumulators live in registers). Each row keeps two sets of accumulators and feeds
 * them alternately: one set would make every chunk wait for the previous chunk's FMA (4 cycles
 * of latency), which bounded the first version at 1.2 ms for a 5632 x 2048 int8 weight. With
 * more than 4 activation rows the rows themselves are independent chains and one set does. */

/* t[i] += w * x[i0 + i][k .. k+16) (masked to `lanes`; x with row stride `stride`) */
static inline __attribute__((always_inline)) void fma_rows(__m512 w, const float *x, int64_t stride, int64_t k,
                                                           __mmask16 lanes, int64_t i0, const int MB, __m512 *t) {
  for (int i = 0; i < MB; i++) t[i] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes, x + (i0 + i) * stride + k), t[i]);
}

/* 16 affine codes from k (fewer where the group ends at k1) as floats */
static inline __attribute__((always_inline)) __m512 affine_codes(int path, const unpacker *u, const uint8_t *row,
                                                                 int64_t bits, int64_t k, int64_t k1) {
  const int count = k1 - k < 16 ? (int)(k1 - k) : 16;
  __m512i q = path == F_AFFINE8 ? _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(first(count), row + k))
                                : unpack16(u, row, bits, k, count);
  return _mm512_cvtepi32_ps(q);
}

/* One block of a spread layout: 16 bytes = 16 * spread codes, each plane multiplied by its part
 * of the deinterleaved x, planes alternating between the two accumulator sets. With a table
 * (log), the plane's codes look their values up; without (affine), they are the values. */
static inline __attribute__((always_inline)) void spread_block(const uint8_t *row, int64_t bits, int64_t k,
                                                               int64_t k1, const __m512 *table, const ms_prep *p,
                                                               int64_t i0, const int MB, __m512 *t0, __m512 *t1) {
  const int64_t spread = 8 / bits, block = 16 * spread, left = k1 - k;
  __m128i raw = left >= block ? _mm_loadu_si128((const __m128i *)(row + k / spread))
                              : _mm_maskz_loadu_epi8(first((left + spread - 1) / spread), row + k / spread);
  const __m512i bytes = _mm512_cvtepu8_epi32(raw), low = _mm512_set1_epi32((1 << bits) - 1);
#define PLANE(q, t)                                                                           \
  do {                                                                                          \
    __m512i c = _mm512_and_si512(_mm512_srli_epi32(bytes, (unsigned)((q) * bits)), low);        \
    fma_rows(table ? _mm512_permutexvar_ps(c, *table) : _mm512_cvtepi32_ps(c), p->xd, p->Kp,    \
             k + 16 * (q), (__mmask16)0xFFFF, i0, MB, t);                                       \
  } while (0)
  PLANE(0, t0);
  PLANE(1, t1);
  if (spread == 4) {
    PLANE(2, t0);
    PLANE(3, t1);
  }
#undef PLANE
}

/* t[i] += w * x[i0 + i][k .. k+16), all 16 lanes inside x */
static inline __attribute__((always_inline)) void fma_full(__m512 w, const float *x, int64_t stride, int64_t k,
                                                           int64_t i0, const int MB, __m512 *t) {
  for (int i = 0; i < MB; i++) t[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (i0 + i) * stride + k), t[i]);
}

/* Runs `chunk(k, lanes)` -> __m512 over [k0, k1) in chunks of 16, two at a time into t0 and t1
 * with unmasked loads while whole pairs fit, then the rest (masked) into t0. */
#define MS_CHUNKS(k0, k1, full_chunk, tail_chunk, x, stride)                                   \
  do {                                                                                       \
    int64_t k_ = (k0);                                                                       \
    for (; k_ + 32 <= (k1); k_ += 32) {                                                      \
      fma_full(full_chunk(k_), x, stride, k_, i0, MB, t0);                                   \
      fma_full(full_chunk(k_ + 16), x, stride, k_ + 16, i0, MB, two ? t1 : t0);             \
    }                                                                                        \
    for (; k_ < (k1); k_ += 16) fma_rows(tail_chunk(k_), x, stride, k_, first((k1) - k_), i0, MB, t0); \
  } while (0)

/* 2- and 4-bit codes: each group's 16 (or 4) possible weights q*s + m in a register table that
 * the codes index (vpermps), so no code is converted to float and no group needs its own sums. */
static inline __attribute__((always_inline)) void affine_spread_row(const ms_weight *d, const ms_prep *p, int64_t r,
                                                                    int64_t i0, const int MB, float *acc) {
  const int64_t K = d->in_features, gs = d->group_size, G = groups_of(d), bits = d->bits;
  const uint8_t *row = d->codes + r * d->row_bytes;
  const uint16_t *scale = d->param0 + r * G, *offset = d->param1 ? d->param1 + r * G : NULL;
  const float centre = -(float)(1 << (bits - 1));
  const int two = MB <= 4;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 t0[MB_MAX], t1[MB_MAX];
  for (int i = 0; i < MB; i++) { t0[i] = _mm512_setzero_ps(); t1[i] = _mm512_setzero_ps(); }
  for (int64_t g = 0; g < G; g++) {
    const int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
    const float s = h2f(scale[g]), m = offset ? h2f(offset[g]) : centre * s;
    const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(m));
    if (bits == 4) /* bits a constant in each loop, so the planes unroll */
      for (int64_t k = k0; k < k1; k += 32) spread_block(row, 4, k, k1, &table, p, i0, MB, t0, two ? t1 : t0);
    else
      for (int64_t k = k0; k < k1; k += 64) spread_block(row, 2, k, k1, &table, p, i0, MB, t0, two ? t1 : t0);
  }
  for (int i = 0; i < MB; i++) acc[i] = _mm512_reduce_add_ps(_mm512_add_ps(t0[i], t1[i]));
}

static inline __attribute__((always_inline)) void affine_row(const ms_weight *d, const ms_prep *p, int path,
                                                             int64_t r, int64_t i0, const int MB, float *acc) {
  const int64_t K = d->in_features, gs = d->group_size, G = groups_of(d), bits = d->bits;
  const uint8_t *row = d->codes + r * d->row_bytes;
  const uint16_t *scale = d->param0 + r * G, *offset = d->param1 ? d->param1 + r * G : NULL;
  const float *x = p->x, *xsum = p->xsum;
  const float centre = -(float)(1 << (bits - 1));
  const int two = MB <= 4;
  const unpacker u = p->u;
  __m512 a[MB_MAX], t0[MB_MAX], t1[MB_MAX];
  float off[MB_MAX];
  for (int i = 0; i < MB; i++) { a[i] = _mm512_setzero_ps(); off[i] = 0.0f; }
#define INT8_FULL(k) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (k)))))
#define INT8_TAIL(k) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(first(k1 - (k)), row + (k))))
#define CODES_FULL(k) _mm512_cvtepi32_ps(unpack16_full(&u, row, bits, (k)))
#define CODES_TAIL(k) _mm512_cvtepi32_ps(unpack16(&u, row, bits, (k), k1 - (k) < 16 ? (int)(k1 - (k)) : 16))
  for (int64_t g = 0; g < G; g++) {
    const int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
    for (int i = 0; i < MB; i++) { t0[i] = _mm512_setzero_ps(); t1[i] = _mm512_setzero_ps(); }
    if (path == F_AFFINE8) {
      MS_CHUNKS(k0, k1, INT8_FULL, INT8_TAIL, x, K);
    } else {
      MS_CHUNKS(k0, k1, CODES_FULL, CODES_TAIL, x, K);
    }
    /* sum_k x (q s + m) = s sum_k x q + m sum_k x */
    const float s = h2f(scale[g]), m = offset ? h2f(offset[g]) : centre * s;
    const __m512 vs = _mm512_set1_ps(s);
    for (int i = 0; i < MB; i++) {
      a[i] = _mm512_fmadd_ps(_mm512_add_ps(t0[i], t1[i]), vs, a[i]);
      off[i] += m * xsum[(i0 + i) * G + g];
    }
  }
#undef INT8_FULL
#undef INT8_TAIL
#undef CODES_FULL
#undef CODES_TAIL
  for (int i = 0; i < MB; i++) acc[i] = _mm512_reduce_add_ps(a[i]) + off[i];
}

static inline __attribute__((always_inline)) void log_row(const ms_weight *d, const ms_prep *p, int path, int64_t r,
                                                          int64_t i0, const int MB, float *acc) {
  const int64_t K = d->in_features, gs = d->group_size, G = groups_of(d), bits = d->bits;
  const uint8_t *row = d->codes + r * d->row_bytes;
  const uint16_t *log_zmin = d->param0 + r * G, *step = d->param1 + r * G;
  const uint32_t level_mask = (1u << (bits - 1)) - 1;
  const int two = MB <= 4;
  const unpacker u = p->u;
  int32_t lv[16];
  float sg[16];
  for (int c = 0; c < 16; c++) {
    lv[c] = (int32_t)(c & level_mask);
    sg[c] = (c >> (bits - 1)) & 1 ? -1.0f : 1.0f;
  }
  const __m512i levels = _mm512_loadu_si512(lv);
  const __m512 level_minus_1 = _mm512_sub_ps(_mm512_cvtepi32_ps(levels), _mm512_set1_ps(1.0f));
  const __m512 signs = _mm512_loadu_ps(sg);
  const __mmask16 nonzero = _mm512_cmpneq_epi32_mask(levels, _mm512_setzero_si512());
  __m512 t0[MB_MAX], t1[MB_MAX];
  for (int i = 0; i < MB; i++) { t0[i] = _mm512_setzero_ps(); t1[i] = _mm512_setzero_ps(); }
  for (int64_t g = 0; g < G; g++) {
    const int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
    /* code c -> 0 at level 0, else (-1)^sign exp(log_zmin + (level - 1) step) */
    __m512 arg = _mm512_fmadd_ps(level_minus_1, _mm512_set1_ps(h2f(step[g])), _mm512_set1_ps(h2f(log_zmin[g])));
    const __m512 table = _mm512_maskz_mul_ps(nonzero, exp16(arg), signs);
    if (path == F_LOG_SPREAD) {
      if (bits == 4)
        for (int64_t k = k0; k < k1; k += 32) spread_block(row, 4, k, k1, &table, p, i0, MB, t0, two ? t1 : t0);
      else
        for (int64_t k = k0; k < k1; k += 64) spread_block(row, 2, k, k1, &table, p, i0, MB, t0, two ? t1 : t0);
      continue;
    }
    for (int64_t k = k0; k < k1; k += 32) {
      __m512 w = _mm512_permutexvar_ps(unpack16(&u, row, bits, k, k1 - k < 16 ? (int)(k1 - k) : 16), table);
      fma_rows(w, p->x, K, k, first(k1 - k), i0, MB, t0);
      if (k + 16 < k1) {
        w = _mm512_permutexvar_ps(unpack16(&u, row, bits, k + 16, k1 - k - 16 < 16 ? (int)(k1 - k - 16) : 16), table);
        fma_rows(w, p->x, K, k + 16, first(k1 - k - 16), i0, MB, two ? t1 : t0);
      }
    }
  }
  for (int i = 0; i < MB; i++) acc[i] = _mm512_reduce_add_ps(_mm512_add_ps(t0[i], t1[i]));
}

/* Centroid fetches: scalar loads inserted into registers. On Zen 4 that is about twice as fast as
 * the AVX-512 gathers, and building the vector in registers (not through a stack buffer) avoids a
 * failed store-to-load forward on every fetch. The fp16 codebook is read as stored: a dim-2
 * centroid is one dword, a dim-4 one a qword. `at(j)` is the index of vector j. */
#define MS_FETCH16(at, t) /* 16 fp16 values */                                                  \
  _mm256_set_m128i(                                                                              \
      _mm_setr_epi16(t[at(8)], t[at(9)], t[at(10)], t[at(11)], t[at(12)], t[at(13)], t[at(14)],   \
                     t[at(15)]),                                                                 \
      _mm_setr_epi16(t[at(0)], t[at(1)], t[at(2)], t[at(3)], t[at(4)], t[at(5)], t[at(6)], t[at(7)]))
#define MS_FETCH32(at, t, j) /* dwords j..j+7 */                                                  \
  _mm256_set_m128i(_mm_setr_epi32(t[at(j + 4)], t[at(j + 5)], t[at(j + 6)], t[at(j + 7)]),        \
                   _mm_setr_epi32(t[at(j)], t[at(j + 1)], t[at(j + 2)], t[at(j + 3)]))
#define MS_FETCH64(at, t, j) /* qwords j..j+3 */                                                  \
  _mm256_set_m128i(_mm_set_epi64x((long long)t[at(j + 3)], (long long)t[at(j + 2)]),              \
                   _mm_set_epi64x((long long)t[at(j + 1)], (long long)t[at(j)]))

/* `dim` is a constant at each call (fused_rows), so each width gets its own loop */
static inline __attribute__((always_inline)) void vq_row(const ms_weight *d, const ms_prep *p, int64_t r,
                                                         int64_t i0, const int MB, float *acc, const int64_t dim) {
  const int64_t K = d->in_features, bits = d->bits, V = (K + dim - 1) / dim;
  const uint8_t *row = d->codes + r * d->row_bytes;
  const uint16_t *cb16 = d->codebook;
  const uint32_t *cb32 = (const uint32_t *)d->codebook;
  const uint64_t *cb64 = (const uint64_t *)d->codebook;
  const int two = MB <= 4;
  const unpacker u = p->u;
  uint32_t ids[16];
  __m512 t0[MB_MAX], t1[MB_MAX];
  for (int i = 0; i < MB; i++) { t0[i] = _mm512_setzero_ps(); t1[i] = _mm512_setzero_ps(); }
  /* 16 vectors (16 * dim weights from k = v * dim) whose indices are at(0..15); FMA(w, k) adds
   * w times x[k .. k+16) into SET, alternating the two sets */
#define VQ_STEP(at, FMA)                                                                                \
  do {                                                                                                  \
    const int64_t k = v * dim;                                                                          \
    if (dim == 1) {                                                                                     \
      FMA(_mm512_cvtph_ps(MS_FETCH16(at, cb16)), k, t0);                                                \
    } else if (dim == 2) {                                                                              \
      FMA(_mm512_cvtph_ps(MS_FETCH32(at, cb32, 0)), k, t0);                                             \
      FMA(_mm512_cvtph_ps(MS_FETCH32(at, cb32, 8)), k + 16, two ? t1 : t0);                             \
    } else {                                                                                            \
      FMA(_mm512_cvtph_ps(MS_FETCH64(at, cb64, 0)), k, t0);                                             \
      FMA(_mm512_cvtph_ps(MS_FETCH64(at, cb64, 4)), k + 16, two ? t1 : t0);                             \
      FMA(_mm512_cvtph_ps(MS_FETCH64(at, cb64, 8)), k + 32, t0);                                        \
      FMA(_mm512_cvtph_ps(MS_FETCH64(at, cb64, 12)), k + 48, two ? t1 : t0);                            \
    }                                                                                                   \
  } while (0)
#define FULL(w, k, set) fma_full(w, p->x, K, k, i0, MB, set)
#define MASKED(w, k, set) fma_rows(w, p->x, K, k, first(K - (k)), i0, MB, set)
  int64_t v = 0;
  if (bits == 8) { /* byte indices, read where they are stored; unmasked while whole */
    const uint8_t *id8 = row;
#define AT8(j) ((uint32_t)id8[v + (j)])
    for (; (v + 16) * dim <= K; v += 16) VQ_STEP(AT8, FULL);
#undef AT8
  }
  for (; v < V; v += 16) {
    _mm512_storeu_si512(ids, unpack16(&u, row, bits, v, V - v < 16 ? (int)(V - v) : 16)); /* 0 past the end: a valid centroid */
#define ATI(j) (ids[j])
    VQ_STEP(ATI, MASKED);
#undef ATI
  }
#undef FULL
#undef MASKED
#undef VQ_STEP
  for (int i = 0; i < MB; i++) acc[i] = _mm512_reduce_add_ps(_mm512_add_ps(t0[i], t1[i]));
}

/* 2:4 and 4:8: 16 kept values span 32 activations; each picks its own with a two-source permute. */
static inline __attribute__((always_inline)) void nm_chunk(const ms_weight *d, const unpacker *u, __m512i base,
                                                           const float *values, const uint8_t *row, int64_t c,
                                                           const ms_prep *p, int64_t i0, const int MB, __m512 *t) {
  const int64_t K = d->in_features, n = d->n, m = d->m, kc = K / m * n;
  const int count = kc - c < 16 ? (int)(kc - c) : 16;
  __m512 v = _mm512_maskz_loadu_ps(first(count), values + c);
  __m512i col = _mm512_add_epi32(base, unpack16(u, row, d->bits, c, count));
  const int64_t x0 = c / n * m;
  if (x0 + 32 <= K) {
    for (int i = 0; i < MB; i++) {
      const float *xr = p->x + (i0 + i) * K + x0;
      t[i] = _mm512_fmadd_ps(v, _mm512_permutex2var_ps(_mm512_loadu_ps(xr), col, _mm512_loadu_ps(xr + 16)), t[i]);
    }
    return;
  }
  const __mmask16 lo = first(K - x0), hi = first(K - x0 - 16);
  for (int i = 0; i < MB; i++) {
    const float *xr = p->x + (i0 + i) * K + x0;
    __m512 xg = _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(lo, xr), col, _mm512_maskz_loadu_ps(hi, xr + 16));
    t[i] = _mm512_fmadd_ps(v, xg, t[i]);
  }
}

static inline __attribute__((always_inline)) void nm_row(const ms_weight *d, const ms_prep *p, int64_t r,
                                                         int64_t i0, const int MB, float *acc) {
  const int64_t K = d->in_features, n = d->n, m = d->m, kc = K / m * n;
  const float *values = d->values + r * kc;
  const uint8_t *row = d->codes + r * d->row_bytes;
  const int two = MB <= 4;
  const unpacker u = p->u;
  int32_t base_lanes[16];
  for (int i = 0; i < 16; i++) base_lanes[i] = (int32_t)(i / n * m);
  const __m512i base = _mm512_loadu_si512(base_lanes);
  __m512 t0[MB_MAX], t1[MB_MAX];
  for (int i = 0; i < MB; i++) { t0[i] = _mm512_setzero_ps(); t1[i] = _mm512_setzero_ps(); }
  for (int64_t c = 0; c < kc; c += 32) {
    nm_chunk(d, &u, base, values, row, c, p, i0, MB, t0);
    if (c + 16 < kc) nm_chunk(d, &u, base, values, row, c + 16, p, i0, MB, two ? t1 : t0);
  }
  for (int i = 0; i < MB; i++) acc[i] = _mm512_reduce_add_ps(_mm512_add_ps(t0[i], t1[i]));
}

/* 16 weights from k: the kept values (read from *values on) expanded under the mask */
static inline __attribute__((always_inline)) __m512 bitmask_chunk(const uint8_t *mask, int64_t mask_bytes, int64_t k,
                                                                  const float **values) {
  const int64_t byte = k >> 3;
  __mmask16 keep = (__mmask16)(mask[byte] | (byte + 1 < mask_bytes ? mask[byte + 1] << 8 : 0));
  const int kept = __builtin_popcount(keep);
  __m512 w = _mm512_maskz_expand_ps(keep, _mm512_maskz_loadu_ps(first(kept), *values));
  *values += kept;
  return w;
}

static inline __attribute__((always_inline)) void bitmask_row(const ms_weight *d, const ms_prep *p, int64_t r,
                                                              int64_t i0, const int MB, float *acc) {
  const int64_t K = d->in_features, mask_bytes = (K + 7) / 8;
  const uint8_t *mask = d->codes + r * d->row_bytes;
  const float *values = d->values + d->row_start[r];
  const int two = MB <= 4;
  __m512 t0[MB_MAX], t1[MB_MAX];
  for (int i = 0; i < MB; i++) { t0[i] = _mm512_setzero_ps(); t1[i] = _mm512_setzero_ps(); }
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    fma_full(bitmask_chunk(mask, mask_bytes, k, &values), p->x, K, k, i0, MB, t0);
    fma_full(bitmask_chunk(mask, mask_bytes, k + 16, &values), p->x, K, k + 16, i0, MB, two ? t1 : t0);
  }
  for (; k < K; k += 16) /* mask bits past K are 0 */
    fma_rows(bitmask_chunk(mask, mask_bytes, k, &values), p->x, K, k, first(K - k), i0, MB, t0);
  for (int i = 0; i < MB; i++) acc[i] = _mm512_reduce_add_ps(_mm512_add_ps(t0[i], t1[i]));
}

#ifdef MS_BF16
/* The narrowed 2/4-bit decode: 32 bytes of codes widened to 32 16-bit lanes, each plane's codes
 * look their bf16 weight up in the group's table (vpermw), and vdpbf16ps multiplies 32 of them
 * by bf16 activations (deinterleaved like the codes, see deinterleave_bf16) into fp32 sums:
 * about half the work per weight of the fp32 path (int4 g64 at 5632 x 2048, 2 threads: ATen's
 * bf16 kernel 0.30 ms, the fp32 path 0.61 ms). */
static inline __attribute__((always_inline)) void bf16_row(const ms_weight *d, const ms_prep *p, int64_t r, int64_t i0,
                                                           const int MB, float *acc, const int bits, const int is_log) {
  const int64_t K = d->in_features, gs = d->group_size, G = groups_of(d), Kp = p->Kp;
  const int spread = 8 / bits;
  const int64_t block = 32 * spread;
  const uint8_t *row = d->codes + r * d->row_bytes;
  const uint16_t *p0 = d->param0 + r * G, *p1 = d->param1 ? d->param1 + r * G : NULL;
  const float centre = -(float)(1 << (bits - 1));
  const int two = MB <= 4;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i low = _mm512_set1_epi16((short)((1 << bits) - 1));
  __m512 level_minus_1 = iota, signs = iota;
  __mmask16 nonzero = 0;
  if (is_log) {
    const uint32_t level_mask = (1u << (bits - 1)) - 1;
    int32_t lv[16];
    float sg[16];
    for (int c = 0; c < 16; c++) {
      lv[c] = (int32_t)(c & level_mask);
      sg[c] = (c >> (bits - 1)) & 1 ? -1.0f : 1.0f;
    }
    const __m512i levels = _mm512_loadu_si512(lv);
    level_minus_1 = _mm512_sub_ps(_mm512_cvtepi32_ps(levels), _mm512_set1_ps(1.0f));
    signs = _mm512_loadu_ps(sg);
    nonzero = _mm512_cmpneq_epi32_mask(levels, _mm512_setzero_si512());
  }
  __m512 t0[MB_MAX], t1[MB_MAX];
  for (int i = 0; i < MB; i++) { t0[i] = _mm512_setzero_ps(); t1[i] = _mm512_setzero_ps(); }
  for (int64_t g = 0; g < G; g++) {
    const int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
    __m512 table;
    if (is_log) {
      __m512 arg = _mm512_fmadd_ps(level_minus_1, _mm512_set1_ps(h2f(p1[g])), _mm512_set1_ps(h2f(p0[g])));
      table = _mm512_maskz_mul_ps(nonzero, exp16(arg), signs);
    } else {
      const float sc = h2f(p0[g]), of = p1 ? h2f(p1[g]) : centre * sc;
      table = _mm512_fmadd_ps(iota, _mm512_set1_ps(sc), _mm512_set1_ps(of));
    }
    const __m512i tab = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(table));
    for (int64_t k = k0; k < k1; k += block) {
      const int64_t left = k1 - k;
      __m256i raw = left >= block ? _mm256_loadu_si256((const __m256i *)(row + k / spread))
                                  : _mm256_maskz_loadu_epi8((__mmask32)((1ull << ((left + spread - 1) / spread)) - 1),
                                                           row + k / spread);
      const __m512i bytes = _mm512_cvtepu8_epi16(raw);
      for (int q = 0; q < spread; q++) {
        __m512i w = _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi16(bytes, (unsigned)(q * bits)), low), tab);
        __m512 *t = (q & 1) && two ? t1 : t0;
        for (int i = 0; i < MB; i++)
          t[i] = _mm512_dpbf16_ps(t[i], (__m512bh)w, (__m512bh)_mm512_loadu_si512(p->xb + (i0 + i) * Kp + k + 32 * q));
      }
    }
  }
  for (int i = 0; i < MB; i++) acc[i] = _mm512_reduce_add_ps(_mm512_add_ps(t0[i], t1[i]));
}

/* int4 affine, narrowed, with the scale applied after the sums instead of a bf16 table per group:
 *   sum_k x_k (s c_k + m) = s sum_k x_k (128 + c_k) + (m - 128 s) sum_k x_k
 * 64 bytes of codes are 32 16-bit lanes of 4 codes each; plane q = (lane >> 4q) & 15, OR'd with
 * 0x4300 in one vpternlogd, is the bf16 number 128 + c exactly, so no table is built and no code
 * is converted. vdpbf16ps adds pairs of lanes, so fp32 lane i holds codes 8i..8i+7 of the block:
 * one group's (g >= 128), or lanes i / (gs / 8) of 128 / gs groups: their scales, widened to those
 * lanes, multiply the block's sums. The group sums of x (of its bf16 values, which the products
 * used) take the offsets. x is deinterleaved by 4 in blocks of 128 (deinterleave_lanes). Compared
 * with bf16_row: no table per group, and one load and no widening per 128 codes. */
static inline __attribute__((always_inline)) void affine4_bf16_row(const ms_weight *d, const ms_prep *p, int64_t r,
                                                                   int64_t i0, const int MB, float *acc) {
  const int64_t K = d->in_features, gs = d->group_size, G = groups_of(d), Kp = p->Kp;
  const uint8_t *row = d->codes + r * d->row_bytes;
  const uint16_t *scale = d->param0 + r * G, *offset = d->param1 ? d->param1 + r * G : NULL;
  const int64_t per_block = gs < 128 ? 128 / gs : 1; /* groups in a block of 128 codes */
  const int64_t lanes_per_group = gs < 128 ? gs / 8 : 16;
  int32_t lane_group[16];
  for (int i = 0; i < 16; i++) lane_group[i] = (int32_t)(i / lanes_per_group);
  const __m512i which = _mm512_loadu_si512(lane_group), low = _mm512_set1_epi16(15);
  const __m512i bf16_128 = _mm512_set1_epi16(0x4300);
  const __mmask8 scales_in_block = (__mmask8)((1u << per_block) - 1);
  __m512 a[MB_MAX];
  for (int i = 0; i < MB; i++) a[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 128) {
    const __m512i raw = _mm512_loadu_si512(row + k / 2);
    __m512 t[MB_MAX];
    for (int q = 0; q < 4; q++) {
      /* (raw >> 4q) & 15 | 0x4300: ternary-logic table 0xEA = (A & B) | C */
      const __m512i w = _mm512_ternarylogic_epi32(q ? _mm512_srli_epi16(raw, (unsigned)(4 * q)) : raw, low, bf16_128, 0xEA);
      for (int i = 0; i < MB; i++) {
        const __m512bh xq = (__m512bh)_mm512_loadu_si512(p->xb + (i0 + i) * Kp + k + 32 * q);
        t[i] = _mm512_dpbf16_ps(q ? t[i] : _mm512_setzero_ps(), (__m512bh)w, xq);
      }
    }
    const __m512 s4 = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_maskz_loadu_epi16(scales_in_block, scale + k / gs)));
    const __m512 sv = _mm512_permutexvar_ps(which, s4);
    for (int i = 0; i < MB; i++) a[i] = _mm512_fmadd_ps(t[i], sv, a[i]);
  }
  /* + sum_g (m_g - 128 s_g) xsum_g, 16 groups at a time; m_g = -8 s_g without offsets */
  const __m512 c128 = _mm512_set1_ps(128.0f), minus136 = _mm512_set1_ps(-136.0f);
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 in = first(G - g);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, scale + g));
    const __m512 m = offset ? _mm512_fnmadd_ps(c128, s, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(in, offset + g)))
                            : _mm512_mul_ps(minus136, s);
    for (int i = 0; i < MB; i++) a[i] = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(in, p->xsum + (i0 + i) * G + g), a[i]);
  }
  for (int i = 0; i < MB; i++) acc[i] = _mm512_reduce_add_ps(a[i]);
}
#endif

static inline __attribute__((always_inline)) void fused_rows(const ms_weight *d, const ms_prep *p, int path,
                                                             int64_t r, int64_t i0, const int MB, float *acc) {
  switch (path) {
    case F_AFFINE_SPREAD: affine_spread_row(d, p, r, i0, MB, acc); break;
    case F_AFFINE8: case F_AFFINE: affine_row(d, p, path, r, i0, MB, acc); break;
    case F_LOG: case F_LOG_SPREAD: log_row(d, p, path, r, i0, MB, acc); break;
    case F_VQ:
      if (d->dim == 2) vq_row(d, p, r, i0, MB, acc, 2);
      else if (d->dim == 4) vq_row(d, p, r, i0, MB, acc, 4);
      else vq_row(d, p, r, i0, MB, acc, 1);
      break;
    case F_NM: nm_row(d, p, r, i0, MB, acc); break;
#ifdef MS_BF16
    case F_AFFINE_BF16:
      if (d->bits == 4) bf16_row(d, p, r, i0, MB, acc, 4, 0);
      else bf16_row(d, p, r, i0, MB, acc, 2, 0);
      break;
    case F_LOG_BF16:
      if (d->bits == 4) bf16_row(d, p, r, i0, MB, acc, 4, 1);
      else bf16_row(d, p, r, i0, MB, acc, 2, 1);
      break;
    case F_AFFINE4_BF16: affine4_bf16_row(d, p, r, i0, MB, acc); break;
#endif
    default: bitmask_row(d, p, r, i0, MB, acc); break;
  }
}

static void fused_row(const ms_weight *d, const ms_prep *p, int path, int64_t r, int64_t M, float *acc) {
  int64_t i0 = 0;
  for (; i0 + 8 <= M; i0 += 8) fused_rows(d, p, path, r, i0, 8, acc + i0);
  if (M - i0 >= 4) { fused_rows(d, p, path, r, i0, 4, acc + i0); i0 += 4; }
  if (M - i0 >= 2) { fused_rows(d, p, path, r, i0, 2, acc + i0); i0 += 2; }
  if (M - i0 >= 1) fused_rows(d, p, path, r, i0, 1, acc + i0);
}
#else
enum { F_DECODE = 0 };
static int fused_path(const ms_weight *d, int narrow) { (void)d; (void)narrow; return F_DECODE; }
static void fused_row(const ms_weight *d, const ms_prep *p, int path, int64_t r, int64_t M, float *acc) {
  (void)d; (void)p; (void)path; (void)r; (void)M; (void)acc;
}
#endif

/* x deinterleaved by `spread` within blocks of lanes*spread: lane j of the block's part q is
 * x[block + spread*j + q]. Matches codes that come out of a byte (int4: low nibbles, then
 * high) or a gather (vq dim 4: component q of 16 vectors). lanes 16: fp32 for the fp32 paths;
 * lanes 32: bf16 for bf16_row and affine4_bf16_row (one vdpbf16ps takes 32). */
static void *deinterleave_lanes(const float *x, int64_t M, int64_t K, int64_t spread, int64_t lanes, int bf16,
                                int64_t *Kp) {
  const int64_t block = lanes * spread;
  *Kp = (K + block - 1) / block * block;
  const size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
  void *xd = aligned_alloc(64, (size_t)(M * *Kp) * size + 64);
  for (int64_t i = 0; i < M; i++)
    for (int64_t b = 0; b < *Kp; b += block)
      for (int64_t q = 0; q < spread; q++)
        for (int64_t j = 0; j < lanes; j++) {
          const int64_t k = b + spread * j + q, at = i * *Kp + b + lanes * q + j;
          const float v = k < K ? x[i * K + k] : 0.0f;
          if (bf16) ((uint16_t *)xd)[at] = float_to_bf16(v);
          else ((float *)xd)[at] = v;
        }
  return xd;
}

static float *deinterleave(const float *x, int64_t M, int64_t K, int64_t spread, int64_t *Kp) {
  return deinterleave_lanes(x, M, K, spread, 16, 0, Kp);
}

static uint16_t *deinterleave_bf16(const float *x, int64_t M, int64_t K, int64_t spread, int64_t *Kp) {
  return deinterleave_lanes(x, M, K, spread, 32, 1, Kp);
}

/* (M, G) sums of x over each group of the weight's rows; as_bf16: of x rounded to bf16. */
static float *group_sums(const ms_weight *d, const float *x, int64_t M, int as_bf16) {
  const int64_t K = d->in_features, G = groups_of(d), gs = d->group_size;
  float *sums = malloc((size_t)(M * G) * sizeof(float));
  for (int64_t i = 0; i < M; i++)
    for (int64_t g = 0; g < G; g++) {
      float s = 0.0f;
      for (int64_t k = g * gs; k < (g + 1) * gs && k < K; k++) {
        float v = x[i * K + k];
        if (as_bf16) {
          const uint32_t bits = (uint32_t)float_to_bf16(v) << 16;
          memcpy(&v, &bits, 4);
        }
        s += v;
      }
      sums[i * G + g] = s;
    }
  return sums;
}

/* y (M, N) = x (M, K) @ W^T + bias, M small (decode). narrow: bf16 products where a narrowed
 * path exists (bf16_path), fp32 elsewhere. */
int ms_linear(const ms_weight *d, const float *x, int64_t M, const float *bias, float *y, int narrow) {
  const int64_t N = d->out_features, K = d->in_features;
  if (M < 1) return 1;
  const int path = fused_path(d, narrow);
  ms_prep p = {x, NULL, K, 1, NULL, codebook_fp32(d), NULL};
#ifdef MS_AVX512
  p.u = make_unpacker(d->bits);
  if (path == F_AFFINE_SPREAD || path == F_LOG_SPREAD) p.xd = deinterleave(x, M, K, spread_of(d->bits), &p.Kp);
  if (path == F_AFFINE_BF16 || path == F_LOG_BF16) p.xb = deinterleave_bf16(x, M, K, spread_of(d->bits), &p.Kp);
  if (path == F_AFFINE4_BF16) { /* 4 codes per 16-bit lane; group sums of the bf16 values the products see */
    p.xb = deinterleave_lanes(x, M, K, 4, 32, 1, &p.Kp);
    p.xsum = group_sums(d, x, M, 1);
  }
  if (path == F_AFFINE8 || path == F_AFFINE) p.xsum = group_sums(d, x, M, 0);
#endif
#pragma omp parallel if (N * K * M >= PARALLEL_MIN_WORK)
  {
    float *w = path == F_DECODE ? aligned_alloc(64, (size_t)((K + 15) / 16 * 16) * sizeof(float)) : NULL;
    float *acc = malloc((size_t)M * sizeof(float));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; r++) {
      if (path == F_DECODE) {
        decode_row(d, p.codebook, r, w);
        for (int64_t i = 0; i < M; i++) acc[i] = dot(w, x + i * K, K);
      } else {
        fused_row(d, &p, path, r, M, acc);
      }
      const float b = bias ? bias[r] : 0.0f;
      for (int64_t i = 0; i < M; i++) y[i * N + r] = acc[i] + b;
    }
    free(w);
    free(acc);
  }
  free(p.xd);
  free(p.xb);
  free(p.xsum);
  free(p.codebook);
  return 0;
}

/* Fortran BLAS sgemm (LP64), as torch's MKL exports it; the caller passes its address. */
typedef void (*ms_sgemm)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);

/* y (M, N) = x (M, K) @ W^T + bias for many rows of x (prefill): one parallel region in which
 * each thread decodes a tile of `tile_rows` weight rows (fp32, kept in its L2) and multiplies
 * it with the whole x by a single-threaded GEMM (MKL runs sequentially inside a parallel
 * region). One region for the call, not one per tile: on a busy machine every region start
 * waits for all its threads to be scheduled. Column-major view: y^T (N x M, ld N), its rows
 * r0..r0+rr = tile (rr x K, row-major = K x rr column-major, transposed) times x^T. */
int ms_linear_tiled(const ms_weight *d, const float *x, int64_t M, const float *bias, float *y, void *sgemm,
                    int64_t tile_rows) {
  const int64_t N = d->out_features, K = d->in_features;
  if (M < 1 || !sgemm || M > 0x7fffffff || N > 0x7fffffff || K > 0x7fffffff) return 1;
  for (int64_t i = 0; i < M; i++)
    for (int64_t n = 0; n < N; n++) y[i * N + n] = bias ? bias[n] : 0.0f;
  const int64_t tiles = (N + tile_rows - 1) / tile_rows;
  float *codebook = codebook_fp32(d);
#pragma omp parallel if (N * K * M >= PARALLEL_MIN_WORK)
  {
    float *tile = aligned_alloc(64, (size_t)(tile_rows * K) * sizeof(float) + 64);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tiles; t++) {
      const int64_t r0 = t * tile_rows, rr = N - r0 < tile_rows ? N - r0 : tile_rows;
      for (int64_t r = r0; r < r0 + rr; r++) decode_row(d, codebook, r, tile + (r - r0) * K);
      const int m = (int)M, n = (int)rr, k = (int)K, ldc = (int)N;
      const float one = 1.0f;
      ((ms_sgemm)sgemm)("T", "N", &n, &m, &k, &one, tile, &k, x, &k, &one, y + r0, &ldc);
    }
    free(tile);
  }
  free(codebook);
  return 0;
}

static void to_bf16(const float *src, uint16_t *dst, int64_t count) {
  int64_t i = 0;
#if defined(MS_AVX512) && defined(__AVX512BF16__)
  for (; i + 16 <= count; i += 16) {
    __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)h);
  }
#endif
  for (; i < count; i++) dst[i] = float_to_bf16(src[i]);
}

/* Rows r0..r1 of W rounded to bf16, into out ((r1 - r0), K): the tiles of the narrowed
 * prefill path, which multiplies them with torch's bf16 GEMM (oneDNN, avx512_bf16: 3x the fp32
 * GEMM's speed here; MKL's gemm_bf16bf16f32 was no faster than fp32 on this CPU). */
int ms_decode_bf16(const ms_weight *d, int64_t r0, int64_t r1, uint16_t *out) {
  const int64_t K = d->in_features;
  float *codebook = codebook_fp32(d);
#pragma omp parallel if ((r1 - r0) * K >= PARALLEL_MIN_WORK)
  {
    float *row = aligned_alloc(64, (size_t)K * sizeof(float) + 64);
#pragma omp for schedule(static)
    for (int64_t r = r0; r < r1; r++) {
      decode_row(d, codebook, r, row);
      to_bf16(row, out + (r - r0) * K, K);
    }
    free(row);
  }
  free(codebook);
  return 0;
}

/* Rows r0..r1 of W, fp32, into out ((r1 - r0), K). */
int ms_decode(const ms_weight *d, int64_t r0, int64_t r1, float *out) {
  const int64_t K = d->in_features;
  float *codebook = codebook_fp32(d);
#pragma omp parallel for schedule(static) if ((r1 - r0) * K >= PARALLEL_MIN_WORK)
  for (int64_t r = r0; r < r1; r++) decode_row(d, codebook, r, out + (r - r0) * K);
  free(codebook);
  return 0;
}

/* W8A8: codes (M, K) int8 activations, scales (M) fp32; weight codes (N, K) stored as q + 128
 * (uint8), scales (N) fp16. y = (sum_k qx * qw) * sx * sw + bias, the sum exact in int32 as
 * in the reference (torch._int_mm). With VNNI: sum (qw + 128) * qx - 128 * sum qx. */
int ms_linear_w8a8(const int8_t *qx, const float *sx, int64_t M, int64_t K, const uint8_t *w, const uint16_t *sw,
                   int64_t N, const float *bias, float *y) {
  int32_t *xsum = malloc((size_t)M * sizeof(int32_t));
  for (int64_t i = 0; i < M; i++) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; k++) s += qx[i * K + k];
    xsum[i] = s;
  }
#pragma omp parallel for schedule(static) if (N * K * M >= PARALLEL_MIN_WORK)
  for (int64_t r = 0; r < N; r++) {
    const uint8_t *wr = w + r * K;
    const float scale = half_to_float(sw[r]), b = bias ? bias[r] : 0.0f;
    for (int64_t i = 0; i < M; i++) {
      const int8_t *xr = qx + i * K;
      int32_t total;
#if defined(MS_AVX512) && defined(__AVX512VNNI__)
      __m512i acc = _mm512_setzero_si512();
      for (int64_t k = 0; k < K; k += 64) {
        __mmask64 lanes = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        acc = _mm512_dpbusd_epi32(acc, _mm512_maskz_loadu_epi8(lanes, wr + k), _mm512_maskz_loadu_epi8(lanes, xr + k));
      }
      total = _mm512_reduce_add_epi32(acc) - 128 * xsum[i];
#else
      /* As the VNNI path: sum (qw + 128) * qx - 128 * sum qx. Written as (qw + 128 - 128) * qx,
       * GCC 12 at -O3 with AVX-VNNI (256-bit; a -mno-avx512f build on a CPU that has it)
       * vectorized the sequential loop wrongly: 6-10 off on a one-row call (tests). */
      total = 0;
      for (int64_t k = 0; k < K; k++) total += (int32_t)wr[k] * (int32_t)xr[k];
      total -= 128 * xsum[i];
#endif
      y[i * N + r] = (float)total * sx[i] * scale + b;
    }
  }
  free(xsum);
  return 0;
}

/* Which vector path this build has: 0 none, 1 AVX-512, 2 with VNNI, 3 with VNNI and BF16. */
int ms_isa(void) {
#if defined(MS_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  return 3;
#elif defined(MS_AVX512) && defined(__AVX512VNNI__)
  return 2;
#elif defined(MS_AVX512)
  return 1;
#else
  return 0;
#endif
}
