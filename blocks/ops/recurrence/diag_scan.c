/* The diagonal scan (V = 1) of gated_linear_recurrence as one loop nest per direction: the
 * `native` backend of blocks/ops/recurrence/native.py, which builds this file with the
 * system's C compiler and calls it through ctypes. Plain C, no PyTorch headers (builds in about
 * a second).
 *
 *   h_t[h, k] = exp(lg_t[h] * A[h, k]) * h_{t-1}[h, k] + v_t[h] * kk_t[g, k]
 *   y_t[h]    = sum_k q_t[g, k] * h_t[h, k]                     g = h / R (the head's q/k group)
 *
 * (without A, one gate per head: exp(lg_t[h]) for every k). A call runs a range of blocks;
 * a block is one batch row and up to W heads of one group, and the W heads are the vector
 * lanes: every inner loop runs over them, so exp, the state update and the reductions over k
 * are W-wide vector code, and q, kk of a step are read once for all lanes. A block's state
 * (K x W numbers) stays in cache for the whole sequence; nothing of size T x H x K is ever
 * written. The forward keeps the state entering every CK-th step; the backward runs the
 * segments last to first, remaking a segment's gates and states from its kept state into a
 * small buffer, and then walks it backwards with the adjoint.
 *
 * Layouts (all contiguous): q, kk (B, T, Hk, K); v, lg, y, dy, dv, dlg (B, T, H);
 * At (K, H), A transposed, or NULL; h0, hT, dh0, dhT (B, H, K); ck (B, ceil(T / CK), H, K);
 * dq, dk (B, T, Hk, P, K), one row per block of a group (P = ceil(R / W)), summed by the caller;
 * dAt (B, K, H), summed over B by the caller. Functions return 0, or 1 when out of memory.
 *
 * The file is its own template: it includes itself once per number type (REAL).
 */
#ifndef REAL

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef HYCOMP_LIBMVEC
/* glibc's vector exp (libmvec) for float64, declared as math.h does only under -ffast-math:
 * the loops below then call its vector exp instead of the scalar one, with IEEE semantics
 * kept for everything else. (float32 uses exp_f32 below.) */
__attribute__((__simd__("notinbranch"))) extern double exp(double);
#endif

#define W 16
#define INLINE static inline __attribute__((always_inline))
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

typedef int64_t i64;

/* e^x in float32 without a library call, so that it vectorizes on any target in ~15
 * instructions: x = n ln 2 + r, n = rint(x / ln 2), |r| <= ln 2 / 2, with n ln 2 taken off in
 * two parts (LN2_HI has its low mantissa bits zero, so n * LN2_HI is exact); e^r by its
 * Taylor series to degree 7 (remainder < (ln 2 / 2)^8 / 8! < 6e-9 relative); 2^n made in the
 * exponent bits. Measured: at most 7.9e-8 relative error (1.3 float32 ulps) against double
 * exp over [-87, 88]. x is clamped to [-127 ln 2, 128 ln 2]: n = -127 gives exactly 0 (values
 * below 2^-126.5 flush to 0), n = 128 gives inf; NaN stays NaN. */
static inline float exp_f32(float x)
{
    const float LN2_HI = 0.693145751953125f, LN2_LO = 1.428606765330187e-06f;
    x = x < -88.02969193f ? -88.02969193f : x;               /* 127 ln 2 */
    x = x > 88.72283905f ? 88.72283905f : x;                 /* 128 ln 2 */
    float n = __builtin_rintf(x * 1.4426950408889634f);
    float r = __builtin_fmaf(-n, LN2_LO, __builtin_fmaf(-n, LN2_HI, x));
    float p = 1.0f / 5040;                                  /* 1 / i!, i = 7 .. 0 */
    p = __builtin_fmaf(p, r, 1.0f / 720);
    p = __builtin_fmaf(p, r, 1.0f / 120);
    p = __builtin_fmaf(p, r, 1.0f / 24);
    p = __builtin_fmaf(p, r, 1.0f / 6);
    p = __builtin_fmaf(p, r, 0.5f);
    p = __builtin_fmaf(p, r, 1.0f);
    p = __builtin_fmaf(p, r, 1.0f);
    union { int32_t i; float f; } s = { .i = ((int32_t)n + 127) << 23 };
    return p * s.f;
}

/* block id -> batch row, group, block within the group, first head, lane count */
static void block_of(i64 id, i64 Hk, i64 R, i64 *b, i64 *g, i64 *p, i64 *h, i64 *w)
{
    i64 P = (R + W - 1) / W;
    *p = id % P;
    *g = (id / P) % Hk;
    *b = id / (P * Hk);
    *h = *g * R + *p * W;
    *w = R - *p * W < W ? R - *p * W : W;
}

#define REAL float
#define SUF f32
#define EXP exp_f32
#include __FILE__
#undef REAL
#undef SUF
#undef EXP

#define REAL double
#define SUF f64
#define EXP exp
#include __FILE__
#undef REAL
#undef SUF
#undef EXP

/* the lane count this file was built with: the caller sizes dq and dk's block rows by it */
int scan_lanes(void) { return W; }

/* 1 when built with OpenMP: a call then runs its blocks on `threads` threads of the OpenMP
 * runtime already loaded (PyTorch's, whose threads are idle or spinning between its ops);
 * 0: one thread per call, and the caller runs calls on threads of its own */
int scan_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#else  /* one number type: REAL, function suffix SUF, its exp EXP */

#define real REAL
#define vec CAT(vec, SUF)
#define ld CAT(ld, SUF)
#define ld0 CAT(ld0, SUF)
#define st CAT(st, SUF)
#define hsum CAT(hsum, SUF)
#define hsums CAT(hsums, SUF)

/* W lanes as one value (GCC/clang vector extension: one or more SIMD registers, whatever the
 * target has) */
typedef real vec __attribute__((vector_size(sizeof(real) * W)));

INLINE vec ld(const real *p) { vec v; memcpy(&v, p, sizeof v); return v; }
INLINE vec ld0(void) { vec v = {0}; return v; }
INLINE void st(real *p, vec v) { memcpy(p, &v, sizeof v); }

/* sum of the lanes, as a tree of vector shuffles and adds (a loop over lanes here would add
 * them one by one, 16 dependent adds) */
INLINE real hsum(vec v)
{
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    v += __builtin_shufflevector(v, v, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
    return v[0];
}

/* the lane sums of W vectors at once, in one vector: out[i] = hsum(m[i]). Pairs of rows
 * are folded together, halving the partial sums each row keeps at every step, so 15 adds
 * and 30 shuffles do what 16 hsums do with 64 of each. */
INLINE vec hsums(const vec *m)
{
    vec a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)       /* rows i, i + 8: 8 partial sums each */
        a[i] = __builtin_shufflevector(m[i], m[i + 8], 0, 1, 2, 3, 4, 5, 6, 7,
                                       16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(m[i], m[i + 8], 8, 9, 10, 11, 12, 13, 14, 15,
                                       24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)       /* rows i, i + 4, i + 8, i + 12: 4 each */
        b[i] = __builtin_shufflevector(a[i], a[i + 4], 0, 1, 2, 3, 16, 17, 18, 19,
                                       8, 9, 10, 11, 24, 25, 26, 27)
             + __builtin_shufflevector(a[i], a[i + 4], 4, 5, 6, 7, 20, 21, 22, 23,
                                       12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)       /* rows i, i + 2, ..., i + 14: 2 each */
        c[i] = __builtin_shufflevector(b[i], b[i + 2], 0, 1, 16, 17, 4, 5, 20, 21,
                                       8, 9, 24, 25, 12, 13, 28, 29)
             + __builtin_shufflevector(b[i], b[i + 2], 2, 3, 18, 19, 6, 7, 22, 23,
                                       10, 11, 26, 27, 14, 15, 30, 31);
    return __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22,    /* rows 0..15 */
                                   8, 24, 10, 26, 12, 28, 14, 30)
         + __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23,
                                   9, 25, 11, 27, 13, 29, 15, 31);
}

/* A block's states between their (K, W) working layout s[k * W + j] and the head-major
 * (w, K) rows of h0, hT, ck, dhT and dh0, m[j * K + k]. */
INLINE void CAT(from_rows, SUF)(real *restrict s, const real *restrict m, i64 K, i64 w)
{
    for (i64 k = 0; k < K; k++)
        for (i64 j = 0; j < w; j++)
            s[k * W + j] = m[j * K + k];
}

INLINE void CAT(to_rows, SUF)(real *restrict m, const real *restrict s, i64 K, i64 w)
{
    for (i64 k = 0; k < K; k++)
        for (i64 j = 0; j < w; j++)
            m[j * K + k] = s[k * W + j];
}

/* Forward of one block, heads h .. h + w - 1 of group g in batch row b. Inlined twice: with
 * w = W (every full block: fixed-length loops, no remainder code) and with the actual w. */
INLINE void CAT(fwd_block, SUF)(
    const real *restrict q, const real *restrict kk, const real *restrict v,
    const real *restrict lg, const real *restrict At, const real *restrict h0,
    real *restrict y, real *restrict hT, real *restrict ck, real *restrict s,
    i64 T, i64 Hk, i64 K, i64 H, i64 CK, i64 b, i64 g, i64 h, const i64 w)
{
    i64 nck = (T + CK - 1) / CK;
    CAT(from_rows, SUF)(s, h0 + (b * H + h) * K, K, w);
    for (i64 t = 0; t < T; t++) {
        if (t % CK == 0)
            CAT(to_rows, SUF)(ck + ((b * nck + t / CK) * H + h) * K, s, K, w);
        i64 row = (b * T + t) * H + h, qrow = ((b * T + t) * Hk + g) * K;
        const real *x = lg + row, *vv = v + row;
        real acc[W], e[W];
        for (i64 j = 0; j < w; j++)
            acc[j] = 0;
        if (!At) {
#pragma omp simd
            for (i64 j = 0; j < w; j++)
                e[j] = EXP(x[j]);
        }
        for (i64 k = 0; k < K; k++) {
            real qk = q[qrow + k], kv = kk[qrow + k], *sk = s + k * W;
            if (At) {
                const real *a = At + k * H + h;
#pragma omp simd
                for (i64 j = 0; j < w; j++) {
                    sk[j] = EXP(x[j] * a[j]) * sk[j] + vv[j] * kv;
                    acc[j] += qk * sk[j];
                }
            } else {
#pragma omp simd
                for (i64 j = 0; j < w; j++) {
                    sk[j] = e[j] * sk[j] + vv[j] * kv;
                    acc[j] += qk * sk[j];
                }
            }
        }
        for (i64 j = 0; j < w; j++)
            y[row + j] = acc[j];
    }
    CAT(to_rows, SUF)(hT + (b * H + h) * K, s, K, w);
}

int CAT(scan_fwd, SUF)(const real *q, const real *kk, const real *v, const real *lg,
                       const real *At, const real *h0, real *y, real *hT, real *ck,
                       i64 T, i64 Hk, i64 K, i64 R, i64 CK, i64 lo, i64 hi, i64 threads)
{
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        real *s = malloc(sizeof(real) * K * W);
        failed = !s;
#pragma omp for schedule(static)
        for (i64 id = lo; id < hi; id++) {
            i64 b, g, p, h, w;
            if (!s)
                continue;
            block_of(id, Hk, R, &b, &g, &p, &h, &w);
            if (w == W)
                CAT(fwd_block, SUF)(q, kk, v, lg, At, h0, y, hT, ck, s, T, Hk, K, Hk * R, CK,
                                    b, g, h, W);
            else
                CAT(fwd_block, SUF)(q, kk, v, lg, At, h0, y, hT, ck, s, T, Hk, K, Hk * R, CK,
                                    b, g, h, w);
        }
        free(s);
    }
    return failed;
}

/* Backward of one block. S[l] (l = 0 .. CK): the state before step l of a segment; G[l]: its
 * gates; gs: the adjoint carried one step back, a_{t+1} dL/dh_{t+1} (dL/dh_T at the start);
 * dA: this block's dL/dA. */
INLINE void CAT(bwd_block, SUF)(
    const real *restrict q, const real *restrict kk, const real *restrict v,
    const real *restrict lg, const real *restrict At, const real *restrict ck,
    const real *restrict dy, const real *restrict dhT,
    real *restrict dq, real *restrict dk, real *restrict dv, real *restrict dlg,
    real *restrict dAt, real *restrict dh0,
    real *restrict S, real *restrict G, real *restrict gs, real *restrict dA,
    i64 T, i64 Hk, i64 K, i64 H, i64 P, i64 CK, i64 b, i64 g, i64 p, i64 h, const i64 w)
{
    i64 nck = (T + CK - 1) / CK;
    if (dhT)
        CAT(from_rows, SUF)(gs, dhT + (b * H + h) * K, K, w);
    else
        memset(gs, 0, sizeof(real) * K * W);
    memset(dA, 0, sizeof(real) * K * W);
    for (i64 c = nck - 1; c >= 0; c--) {
        i64 t0 = c * CK, n = T - t0 < CK ? T - t0 : CK;
        CAT(from_rows, SUF)(S, ck + ((b * nck + c) * H + h) * K, K, w);
        for (i64 l = 0; l < n; l++) {                 /* the segment's gates and states */
            i64 row = (b * T + t0 + l) * H + h, qrow = ((b * T + t0 + l) * Hk + g) * K;
            const real *x = lg + row, *vv = v + row;
            real e[W];
            if (!At) {
#pragma omp simd
                for (i64 j = 0; j < w; j++)
                    e[j] = EXP(x[j]);
            }
            for (i64 k = 0; k < K; k++) {
                real kv = kk[qrow + k], *gl = G + (l * K + k) * W;
                const real *sp = S + (l * K + k) * W;
                real *sn = S + ((l + 1) * K + k) * W;
                if (At) {
                    const real *a = At + k * H + h;
#pragma omp simd
                    for (i64 j = 0; j < w; j++)
                        gl[j] = EXP(x[j] * a[j]);
                } else {
                    for (i64 j = 0; j < w; j++)
                        gl[j] = e[j];
                }
#pragma omp simd
                for (i64 j = 0; j < w; j++)
                    sn[j] = gl[j] * sp[j] + vv[j] * kv;
            }
        }
        for (i64 l = n - 1; l >= 0; l--) {            /* the adjoint, backwards in time */
            i64 t = t0 + l, row = (b * T + t) * H + h, qrow = (b * T + t) * Hk + g;
            const real *x = lg + row, *vv = v + row, *dyt = dy + row;
            const real *qt = q + qrow * K, *kt = kk + qrow * K;
            real *dqt = dq + (qrow * P + p) * K, *dkt = dk + (qrow * P + p) * K;
            if (w == W) {
                /* full blocks (every block of Mamba-1): the same step on vector values, so
                   that dv and dlog stay in registers across k and the sums over heads run as
                   trees (the loop below keeps them in memory and adds lane by lane) */
                vec dyv = ld(dyt), vvv = ld(vv), xv = ld(x), dva = ld0(), dla = ld0();
                for (i64 k0 = 0; k0 < K; k0 += W) {
                    i64 kn = K - k0 < W ? K - k0 : W;
                    vec pq[W], pk[W];       /* the products summed over heads for dq, dk */
                    for (i64 i = 0; i < kn; i++) {
                        i64 k = k0 + i;
                        real *gk = gs + k * W, *dak = dA + k * W;
                        vec gt = ld(gk) + qt[k] * dyv;                  /* dL/dh_t */
                        vec gn = ld(G + (l * K + k) * W) * gt;          /* a_t dL/dh_t */
                        vec z = gn * ld(S + (l * K + k) * W);           /* dL/d(log a_t) */
                        dva += gt * kt[k];
                        if (At) {
                            dla += z * ld(At + k * H + h);
                            st(dak, ld(dak) + z * xv);
                        } else {
                            dla += z;
                        }
                        st(gk, gn);
                        pq[i] = dyv * ld(S + ((l + 1) * K + k) * W);
                        pk[i] = gt * vvv;
                    }
                    if (kn == W) {
                        st(dqt + k0, hsums(pq));
                        st(dkt + k0, hsums(pk));
                    } else {
                        for (i64 i = 0; i < kn; i++) {
                            dqt[k0 + i] = hsum(pq[i]);
                            dkt[k0 + i] = hsum(pk[i]);
                        }
                    }
                }
                st(dv + row, dva);
                st(dlg + row, dla);
                continue;
            }
            real dva[W], dla[W];
            for (i64 j = 0; j < w; j++)
                dva[j] = dla[j] = 0;
            for (i64 k = 0; k < K; k++) {
                real qk = qt[k], kv = kt[k], sq = 0, sk = 0;
                real *gk = gs + k * W, *dak = dA + k * W;
                const real *gl = G + (l * K + k) * W;
                const real *sp = S + (l * K + k) * W, *sn = S + ((l + 1) * K + k) * W;
                if (At) {
                    const real *a = At + k * H + h;
#pragma omp simd reduction(+:sq, sk)
                    for (i64 j = 0; j < w; j++) {
                        real gt = gk[j] + qk * dyt[j];          /* dL/dh_t */
                        real z = gl[j] * gt * sp[j];            /* dL/d(log a_t) */
                        dva[j] += gt * kv;
                        sk += gt * vv[j];
                        sq += dyt[j] * sn[j];
                        dla[j] += z * a[j];
                        dak[j] += z * x[j];
                        gk[j] = gl[j] * gt;
                    }
                } else {
#pragma omp simd reduction(+:sq, sk)
                    for (i64 j = 0; j < w; j++) {
                        real gt = gk[j] + qk * dyt[j];
                        real z = gl[j] * gt * sp[j];
                        dva[j] += gt * kv;
                        sk += gt * vv[j];
                        sq += dyt[j] * sn[j];
                        dla[j] += z;
                        gk[j] = gl[j] * gt;
                    }
                }
                dqt[k] = sq;
                dkt[k] = sk;
            }
            for (i64 j = 0; j < w; j++) {
                dv[row + j] = dva[j];
                dlg[row + j] = dla[j];
            }
        }
    }
    CAT(to_rows, SUF)(dh0 + (b * H + h) * K, gs, K, w);
    for (i64 k = 0; k < K; k++)
        for (i64 j = 0; j < w; j++)
            dAt[(b * K + k) * H + h + j] = dA[k * W + j];
}

int CAT(scan_bwd, SUF)(const real *q, const real *kk, const real *v, const real *lg,
                       const real *At, const real *ck, const real *dy, const real *dhT,
                       real *dq, real *dk, real *dv, real *dlg, real *dAt, real *dh0,
                       i64 T, i64 Hk, i64 K, i64 R, i64 CK, i64 lo, i64 hi, i64 threads)
{
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed)
    {
        i64 P = (R + W - 1) / W;
        real *S = malloc(sizeof(real) * (CK + 1) * K * W), *G = malloc(sizeof(real) * CK * K * W);
        real *gs = malloc(sizeof(real) * K * W), *dA = malloc(sizeof(real) * K * W);
        int ok = S && G && gs && dA;
        failed = !ok;
#pragma omp for schedule(static)
        for (i64 id = lo; id < hi; id++) {
            i64 b, g, p, h, w;
            if (!ok)
                continue;
            block_of(id, Hk, R, &b, &g, &p, &h, &w);
            if (w == W)
                CAT(bwd_block, SUF)(q, kk, v, lg, At, ck, dy, dhT, dq, dk, dv, dlg, dAt, dh0,
                                    S, G, gs, dA, T, Hk, K, Hk * R, P, CK, b, g, p, h, W);
            else
                CAT(bwd_block, SUF)(q, kk, v, lg, At, ck, dy, dhT, dq, dk, dv, dlg, dAt, dh0,
                                    S, G, gs, dA, T, Hk, K, Hk * R, P, CK, b, g, p, h, w);
        }
        free(S);
        free(G);
        free(gs);
        free(dA);
    }
    return failed;
}

#undef real
#undef vec
#undef ld
#undef ld0
#undef st
#undef hsum
#undef hsums

#endif
