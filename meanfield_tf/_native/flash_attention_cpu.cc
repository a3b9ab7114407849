// Memory-linear softmax attention over (head, query) rows that share their keys and values:
// the forward (row means and log-sum-exp) and the backward (row, key and log-weight cotangents)
// of meanfield_tf's fused Euler step, as XLA FFI handlers for the CPU.
//
// For one sequence with keys x_j (n, d), log-weights l_j and query rows z_i (R, d):
//   s_ij = z_i . x_j + l_j,  lse_i = log sum_j exp(s_ij),  p_ij = exp(s_ij - lse_i),
//   y_i = sum_j p_ij x_j.
// Backward, for row cotangents g_i of y_i and D_i = g_i . y_i:
//   ds_ij = p_ij (g_i . x_j - D_i),  dz_i = sum_j ds_ij x_j,
//   dx_j = sum_i (p_ij g_i + ds_ij z_i),  dl_j = sum_i ds_ij.
// Each row streams over all keys once (forward: twice, scores then probabilities); keys are held
// transposed (d, n) so that every product runs across W keys at a time in one SIMD register.
// Nothing of size R x n is stored.  Rows are split into tasks over XLA's intra-op thread pool;
// each backward task accumulates its key cotangents privately and the partials are summed after.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBytes = 64;  // one AVX-512 register; the compiler splits it on narrower ISAs

template <class T> struct Simd;
template <> struct Simd<float> {
  typedef float V __attribute__((vector_size(kBytes)));
  typedef int32_t I __attribute__((vector_size(kBytes)));
  static constexpr int W = kBytes / sizeof(float);
};
template <> struct Simd<double> {
  typedef double V __attribute__((vector_size(kBytes)));
  typedef int64_t I __attribute__((vector_size(kBytes)));
  static constexpr int W = kBytes / sizeof(double);
};

// exp of a float vector, for arguments <= 0 (the kernels only take exp of a score minus its row
// maximum or log-sum-exp).  Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and a degree-7
// polynomial for e^r (the classic single-precision minimax coefficients): about 1 ulp.  Results
// below the smallest normal float flush to 0; -inf gives 0 and NaN stays NaN.
inline Simd<float>::V vexp(Simd<float>::V x) {
  typedef Simd<float>::V V;
  typedef Simd<float>::I I;
  const V hi = V{} + 88.0f, lo = V{} + -87.33654f;
  const auto under = x < lo;  // also -inf; NaN compares false everywhere and stays NaN
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  V t = x * 1.44269504088896341f + magic;
  V n = t - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V r2 = r * r;
  V p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  I bits = (I)t - (I)(V{} + magic);     // the integer n
  V scale = (V)((bits + 127) << 23);   // 2^n
  V e = p * scale;
  return under ? V{} : e;
}

// Doubles (used by the float64 reference runs): the C library's exp, lane by lane.
inline Simd<double>::V vexp(Simd<double>::V x) {
  Simd<double>::V e;
  for (int l = 0; l < Simd<double>::W; ++l) e[l] = std::exp(x[l]);
  return e;
}

template <class V, int W>
inline auto hsum(V v) {
  auto s = v[0];
  for (int l = 1; l < W; ++l) s += v[l];
  return s;
}

template <class V, int W>
inline auto hmax(V v) {
  auto s = v[0];
  for (int l = 1; l < W; ++l) s = std::max(s, v[l]);
  return s;
}

// Shuffle indices of hsum_many: at the level where blocks of L lanes fold to L/2, output lane o
// takes lane r (and r + L/2) of block q of the first input vector, or of the second for q past
// the first's blocks.
template <class T>
struct FoldTables {
  typename Simd<T>::I lo[8], hi[8];
  FoldTables() {
    constexpr int W = Simd<T>::W;
    int level = 0;
    for (int L = W; L > 1; L /= 2, ++level) {
      const int half = L / 2, per = W / L;
      for (int o = 0; o < W; ++o) {
        const int q = o / half, r = o % half;
        const int src = q < per ? q * L + r : W + (q - per) * L + r;
        lo[level][o] = src;
        hi[level][o] = src + half;
      }
    }
  }
};
template <class T>
const FoldTables<T> kFold{};

// Horizontal sums of d vectors at once: out[k] = sum of the lanes of acc[k].  Pairs of vectors
// are folded in halves (one shuffle pair and one add per pair and level), so W accumulators take
// W - 1 adds instead of W (W - 1) scalar ones.
template <class T>
void hsum_many(typename Simd<T>::V* acc, int64_t d, T* out) {
  typedef typename Simd<T>::V V;
  typedef typename Simd<T>::I I;
  constexpr int W = Simd<T>::W;
  for (int64_t k0 = 0; k0 < d; k0 += W) {
    V v[W];
    const int64_t m = std::min<int64_t>(W, d - k0);
    for (int64_t k = 0; k < W; ++k) v[k] = k < m ? acc[k0 + k] : V{};
    int count = W;  // vectors left; each holds W / count accumulators in blocks of count lanes
    int level = 0;
    for (int L = W; L > 1; L /= 2, ++level) {
      const I& lo = kFold<T>.lo[level];
      const I& hi = kFold<T>.hi[level];
      for (int c = 0; c < count / 2; ++c)
        v[c] = __builtin_shuffle(v[2 * c], v[2 * c + 1], lo) +
               __builtin_shuffle(v[2 * c], v[2 * c + 1], hi);
      count /= 2;
    }
    for (int64_t k = 0; k < m; ++k) out[k0 + k] = v[0][k];
  }
}

// Run body(t) for t in [0, tasks) on the caller and XLA's intra-op pool; returns when all are
// done.  The caller never waits for a helper that has not started: XLA may run two of these calls
// at once on the pool's own threads, and waiting for a helper queued behind a busy pool would
// deadlock.  A helper that starts after the caller has finished the tasks returns at once (the
// shared state it checks is reference-counted, so it outlives the call).
struct TaskState {
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t started = 0, finished = 0;
  bool closed = false;
};

template <class F>
void parallel_tasks(ffi::ThreadPool& pool, int64_t tasks, F body) {
  // the caller works too: with the pool's threads minus one, one thread per core
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, tasks - 1);
  if (helpers <= 0) {
    for (int64_t t = 0; t < tasks; ++t) body(t);
    return;
  }
  auto state = std::make_shared<TaskState>();
  auto work = [&body, tasks](TaskState& st) {
    for (int64_t t; (t = st.next.fetch_add(1)) < tasks;) body(t);
  };
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state, work]() {
      {
        std::lock_guard<std::mutex> lock(state->mu);
        if (state->closed) return;  // the call is over: body may no longer exist
        ++state->started;
      }
      work(*state);
      std::lock_guard<std::mutex> lock(state->mu);
      ++state->finished;
      state->cv.notify_all();
    });
  }
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->closed = true;  // from now on no helper starts
  state->cv.wait(lock, [&] { return state->finished == state->started; });
}

template <class T>
struct Aligned {
  T* p = nullptr;
  explicit Aligned(size_t count) {
    size_t bytes = ((count * sizeof(T) + kBytes - 1) / kBytes) * kBytes;
    p = static_cast<T*>(std::aligned_alloc(kBytes, std::max<size_t>(bytes, kBytes)));
  }
  ~Aligned() { std::free(p); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
};

// Keys of one sequence in key blocks of W: block b holds, for k = 0..d-1, the k-th coordinate of
// keys bW..bW+W-1 (one vector each), so a row's pass over the keys reads memory in order.  The
// log-weights go to (npad,).  Keys are padded with zeros of log-weight -inf (weight 0) up to npad.
template <class T>
void transpose_keys(const T* x, const T* lw, int64_t n, int64_t d, int64_t npad, T* xt, T* lwt) {
  constexpr int W = Simd<T>::W;
  for (int64_t j = 0; j < npad; ++j) {
    T* dst = xt + (j / W) * d * W + j % W;
    for (int64_t k = 0; k < d; ++k) dst[k * W] = j < n ? x[j * d + k] : T(0);
    lwt[j] = j < n ? lw[j] : -std::numeric_limits<T>::infinity();
  }
}

struct Split {  // rows of each sequence in `chunks` contiguous pieces; tasks = batch * chunks
  int64_t batch, rows, chunks;
  int64_t tasks() const { return batch * chunks; }
  int64_t begin(int64_t c) const { return rows * c / chunks; }
  int64_t end(int64_t c) const { return rows * (c + 1) / chunks; }
};

Split split_rows(int64_t batch, int64_t rows, int64_t threads) {
  // at least two tasks per thread (load balance), at most one per 64 rows
  int64_t want = std::max<int64_t>(1, (2 * std::max<int64_t>(threads, 1) + batch - 1) / batch);
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(want, rows / 64));
  return Split{batch, rows, chunks};
}

// D > 0: the head dimension as a compile-time constant (accumulators live in registers);
// D == 0: any d up to kMaxD, read at run time.
constexpr int kMaxD = 64;
constexpr int kUnroll = 4;   // key blocks per step of the score loops; keys are padded to it
constexpr int kTile = 16;    // rows per tile: they share each chunk of keys (fwd), each key block's dx (bwd)

constexpr int64_t kKeyChunk = 32;  // key blocks per chunk of keys (a multiple of kUnroll)

// The passes of one row over the key blocks [b0, b1), shared by the loop orders below.  X holds
// the keys transposed in blocks (block b: d vectors of W keys), LW their log-weights.

// Scores S[b] = z . x + log w, kUnroll blocks at a time (independent FMA chains: the sum over k
// is latency-bound otherwise); returns the running maximum.
template <class T, int D>
inline typename Simd<T>::V score_blocks(const T* zi, const typename Simd<T>::V* X,
                                        const typename Simd<T>::V* LW, int64_t d_rt, int64_t b0,
                                        int64_t b1, typename Simd<T>::V* S,
                                        typename Simd<T>::V vmax) {
  typedef typename Simd<T>::V V;
  const int64_t d = D > 0 ? D : d_rt;
  for (int64_t b = b0; b < b1; b += kUnroll) {
    V sc[kUnroll];
    #pragma GCC unroll 8
    for (int u = 0; u < kUnroll; ++u) sc[u] = LW[b + u];
    #pragma GCC unroll 64
    for (int64_t k = 0; k < d; ++k)
      #pragma GCC unroll 8
      for (int u = 0; u < kUnroll; ++u) sc[u] += zi[k] * X[(b + u) * d + k];
    #pragma GCC unroll 8
    for (int u = 0; u < kUnroll; ++u) {
      S[b + u] = sc[u];
      vmax = sc[u] > vmax ? sc[u] : vmax;
    }
  }
  return vmax;
}

// Scores and g . x of the backward (kUnroll/2 blocks at a time, two chains each): P[b], DS[b].
template <class T, int D>
inline void score_dot_blocks(const T* zi, const T* gi, const typename Simd<T>::V* X,
                             const typename Simd<T>::V* LW, int64_t d_rt, int64_t b0, int64_t b1,
                             typename Simd<T>::V* P, typename Simd<T>::V* DS) {
  typedef typename Simd<T>::V V;
  constexpr int U = kUnroll / 2;
  const int64_t d = D > 0 ? D : d_rt;
  for (int64_t b = b0; b < b1; b += U) {
    V sc[U], dp[U];
    #pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      sc[u] = LW[b + u];
      dp[u] = V{};
    }
    #pragma GCC unroll 64
    for (int64_t k = 0; k < d; ++k) {
      #pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        V xk = X[(b + u) * d + k];
        sc[u] += zi[k] * xk;
        dp[u] += gi[k] * xk;
      }
    }
    #pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      P[b + u] = sc[u];
      DS[b + u] = dp[u];
    }
  }
}

// S[b] <- exp(S[b] - m) over all blocks, alone (independent iterations); returns the row's sum.
template <class T>
inline T exp_blocks(typename Simd<T>::V* S, int64_t blocks, T m) {
  typedef typename Simd<T>::V V;
  V vsum = V{};
  for (int64_t b = 0; b < blocks; ++b) {
    V p = vexp(S[b] - m);
    S[b] = p;
    vsum += p;
  }
  return hsum<V, Simd<T>::W>(vsum);
}

// p = exp(score - lse), ds = p (g.x - D) in place, and the log-weight cotangents DL += ds.
template <class T>
inline void prob_blocks(typename Simd<T>::V* P, typename Simd<T>::V* DS, typename Simd<T>::V* DL,
                        int64_t blocks, T li, T di) {
  typedef typename Simd<T>::V V;
  for (int64_t b = 0; b < blocks; ++b) {
    V p = vexp(P[b] - li);
    V ds = p * (DS[b] - di);
    P[b] = p;
    DS[b] = ds;
    DL[b] += ds;
  }
}

// acc[k] += sum over blocks [b0, b1) of C[b] * x_k (the weighted sums of a row, in registers).
template <class T, int D>
inline void accumulate_blocks(const typename Simd<T>::V* C, const typename Simd<T>::V* X,
                              int64_t d_rt, int64_t b0, int64_t b1, typename Simd<T>::V* acc) {
  const int64_t d = D > 0 ? D : d_rt;
  for (int64_t b = b0; b < b1; ++b) {
    const typename Simd<T>::V c = C[b];
    #pragma GCC unroll 64
    for (int64_t k = 0; k < d; ++k) acc[k] += c * X[b * d + k];
  }
}

// The same, the row's d accumulators loaded from and stored back to memory around the chunk.
template <class T, int D>
inline void accumulate_chunk(const typename Simd<T>::V* C, const typename Simd<T>::V* X,
                             int64_t d_rt, int64_t b0, int64_t b1, typename Simd<T>::V* mem) {
  typename Simd<T>::V acc[D > 0 ? D : kMaxD];
  const int64_t d = D > 0 ? D : d_rt;
  #pragma GCC unroll 64
  for (int64_t k = 0; k < d; ++k) acc[k] = mem[k];
  accumulate_blocks<T, D>(C, X, d_rt, b0, b1, acc);
  #pragma GCC unroll 64
  for (int64_t k = 0; k < d; ++k) mem[k] = acc[k];
}

inline int64_t forward_scratch(int64_t npad, int64_t d, int64_t W) {  // elements
  return kTile * npad + kTile * d * W + kTile * W;
}

// Forward of the rows [r0, r1).  Up to kKeyChunk key blocks (the keys sit in L1): one row at a
// time, scores, exps, weighted means.  Longer rows: tiles of kTile rows, the keys in chunks of
// kKeyChunk blocks (32 KiB for 512 float32 keys, d = 16) that stay in L1 while every row of the
// tile passes over them, instead of each row streaming all n keys from L2; the rows' weighted
// sums wait in memory between chunks.
template <class T, int D>
void forward_rows(const T* z, const T* xt, const T* lwt, int64_t d_rt, int64_t npad,
                  int64_t r0, int64_t r1, T* s, T* y, T* lse) {
  typedef typename Simd<T>::V V;
  constexpr int W = Simd<T>::W;
  const int64_t d = D > 0 ? D : d_rt;
  const int64_t blocks = npad / W;  // a multiple of kUnroll
  const V* X = reinterpret_cast<const V*>(xt);
  const V* LW = reinterpret_cast<const V*>(lwt);
  V* S = reinterpret_cast<V*>(s);  // (kTile, blocks): scores, then probabilities
  V* ACC = S + kTile * blocks;     // (kTile, d): the rows' weighted sums
  V* VMAX = ACC + kTile * d;       // (kTile,)
  const V ninf = V{} - std::numeric_limits<T>::infinity();
  const bool whole = blocks <= kKeyChunk;
  for (int64_t t0 = r0; t0 < r1; t0 += kTile) {
    const int64_t tile = std::min<int64_t>(kTile, r1 - t0);
    for (int64_t r = 0; r < tile; ++r) VMAX[r] = ninf;
    for (int64_t c0 = 0; c0 < blocks; c0 += kKeyChunk)
      for (int64_t r = 0; r < tile; ++r)
        VMAX[r] = score_blocks<T, D>(z + (t0 + r) * d, X, LW, d, c0,
                                     std::min<int64_t>(blocks, c0 + kKeyChunk), S + r * blocks,
                                     VMAX[r]);
    T total[kTile];
    for (int64_t r = 0; r < tile; ++r) {
      T m = hmax<V, W>(VMAX[r]);
      if (!std::isfinite(m)) m = T(0);
      total[r] = exp_blocks<T>(S + r * blocks, blocks, m);
      lse[t0 + r] = m + std::log(total[r]);
      for (int64_t k = 0; k < d; ++k) ACC[r * d + k] = V{};
      if (whole) accumulate_chunk<T, D>(S + r * blocks, X, d, 0, blocks, ACC + r * d);
    }
    for (int64_t c0 = 0; !whole && c0 < blocks; c0 += kKeyChunk)
      for (int64_t r = 0; r < tile; ++r)
        accumulate_chunk<T, D>(S + r * blocks, X, d, c0, std::min<int64_t>(blocks, c0 + kKeyChunk),
                               ACC + r * d);
    for (int64_t r = 0; r < tile; ++r) {
      hsum_many<T>(ACC + r * d, d, y + (t0 + r) * d);
      for (int64_t k = 0; k < d; ++k) y[(t0 + r) * d + k] /= total[r];
    }
  }
}

// Backward of the rows [r0, r1) in tiles of kTile rows.  Per row: the scores and g.x; p and ds
// alone (independent exps); the row's dz (for long rows, these passes go a chunk of kKeyChunk
// blocks at a time over the whole tile, so that the chunk's keys stay in L1).  Then one pass
// over the key blocks for the whole tile: each block's dx (d vectors) stays in registers while
// the tile's rows add p g + ds z to it, so it is loaded and stored once per tile, not once per
// row (that read-modify-write, not the arithmetic, bounded the one-row version).
template <class T, int D>
void backward_rows(const T* z, const T* g, const T* lse, const T* dd, const T* xt, const T* lwt,
                   int64_t d_rt, int64_t npad, int64_t r0, int64_t r1, T* dz, T* dxt, T* dlw,
                   T* s) {
  typedef typename Simd<T>::V V;
  constexpr int W = Simd<T>::W;
  const int64_t d = D > 0 ? D : d_rt;
  const int64_t blocks = npad / W;  // a multiple of kUnroll
  const V* X = reinterpret_cast<const V*>(xt);
  const V* LW = reinterpret_cast<const V*>(lwt);
  V* DX = reinterpret_cast<V*>(dxt);
  V* DL = reinterpret_cast<V*>(dlw);
  V* ACC = reinterpret_cast<V*>(s) + kTile * 2 * blocks;  // (kTile, d): the rows' dz sums
  const bool whole = blocks <= kKeyChunk;
  V acc[D > 0 ? D : kMaxD];
  for (int64_t t0 = r0; t0 < r1; t0 += kTile) {
    const int64_t tile = std::min<int64_t>(kTile, r1 - t0);
    auto P = [&](int64_t r) { return reinterpret_cast<V*>(s) + r * 2 * blocks; };
    for (int64_t c0 = 0; c0 < blocks; c0 += kKeyChunk) {
      const int64_t c1 = std::min<int64_t>(blocks, c0 + kKeyChunk);
      for (int64_t r = 0; r < tile; ++r) {
        score_dot_blocks<T, D>(z + (t0 + r) * d, g + (t0 + r) * d, X, LW, d, c0, c1, P(r),
                               P(r) + blocks);
        if (!whole) continue;
        prob_blocks<T>(P(r), P(r) + blocks, DL, blocks, lse[t0 + r], dd[t0 + r]);
        #pragma GCC unroll 64
        for (int64_t k = 0; k < d; ++k) acc[k] = V{};
        accumulate_blocks<T, D>(P(r) + blocks, X, d, 0, blocks, acc);
        hsum_many<T>(acc, d, dz + (t0 + r) * d);
      }
    }
    if (!whole) {
      for (int64_t r = 0; r < tile; ++r) {
        prob_blocks<T>(P(r), P(r) + blocks, DL, blocks, lse[t0 + r], dd[t0 + r]);
        for (int64_t k = 0; k < d; ++k) ACC[r * d + k] = V{};
      }
      for (int64_t c0 = 0; c0 < blocks; c0 += kKeyChunk)
        for (int64_t r = 0; r < tile; ++r)
          accumulate_chunk<T, D>(P(r) + blocks, X, d, c0, std::min<int64_t>(blocks, c0 + kKeyChunk),
                                 ACC + r * d);
      for (int64_t r = 0; r < tile; ++r) hsum_many<T>(ACC + r * d, d, dz + (t0 + r) * d);
    }
    for (int64_t b = 0; b < blocks; ++b) {
      #pragma GCC unroll 64
      for (int64_t k = 0; k < d; ++k) acc[k] = DX[b * d + k];
      for (int64_t r = 0; r < tile; ++r) {
        const T* zi = z + (t0 + r) * d;
        const T* gi = g + (t0 + r) * d;
        const V p = P(r)[b], ds = P(r)[blocks + b];
        #pragma GCC unroll 64
        for (int64_t k = 0; k < d; ++k) acc[k] += p * gi[k] + ds * zi[k];
      }
      #pragma GCC unroll 64
      for (int64_t k = 0; k < d; ++k) DX[b * d + k] = acc[k];
    }
  }
}

// The key cotangents of each sequence, summed over its `chunks` tasks' partials (each `part`
// elements: d vectors per key block, then the log-weight cotangents), back to dx (n, d) (added to
// what dx holds when `add`) and dlw (n,).
template <class T>
void sum_key_partials(const T* partials, int64_t batch, int64_t chunks, int64_t part, int64_t n,
                      int64_t d, int64_t npad, bool add, T* dx, T* dlw) {
  constexpr int W = Simd<T>::W;
  for (int64_t b = 0; b < batch; ++b) {
    const T* pb = partials + b * chunks * part;
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t k = 0; k < d; ++k) {
        T acc = 0;
        for (int64_t c = 0; c < chunks; ++c) acc += pb[c * part + (j / W) * d * W + k * W + j % W];
        T& out = dx[(b * n + j) * d + k];
        out = add ? out + acc : acc;
      }
      T acc = 0;
      for (int64_t c = 0; c < chunks; ++c) acc += pb[c * part + d * npad + j];
      dlw[b * n + j] = acc;
    }
  }
}

template <class T, int D>
void forward_batch(ffi::ThreadPool& pool, const T* z, const T* x, const T* lw, int64_t batch,
                   int64_t rows, int64_t n, int64_t d, T* y, T* lse) {
  constexpr int W = Simd<T>::W;
  const int64_t npad = (n + kUnroll * W - 1) / (kUnroll * W) * (kUnroll * W);
  Split sp = split_rows(batch, rows, pool.num_threads());
  parallel_tasks(pool, sp.tasks(), [&](int64_t t) {
    int64_t b = t / sp.chunks, c = t % sp.chunks;
    Aligned<T> xt(d * npad), lwt(npad), s(forward_scratch(npad, d, W));
    transpose_keys(x + b * n * d, lw + b * n, n, d, npad, xt.p, lwt.p);
    forward_rows<T, D>(z + b * rows * d, xt.p, lwt.p, d, npad, sp.begin(c), sp.end(c), s.p,
                       y + b * rows * d, lse + b * rows);
  });
}

template <class T, int D>
void backward_batch(ffi::ThreadPool& pool, const T* z, const T* x, const T* lw, const T* lse,
                    const T* g, const T* dd, int64_t batch, int64_t rows, int64_t n, int64_t d,
                    T* dz, T* dx, T* dlw) {
  constexpr int W = Simd<T>::W;
  const int64_t npad = (n + kUnroll * W - 1) / (kUnroll * W) * (kUnroll * W);
  Split sp = split_rows(batch, rows, pool.num_threads());
  const int64_t part = (d + 1) * npad;  // one task's key and log-weight cotangents
  Aligned<T> partials(sp.tasks() * part);
  parallel_tasks(pool, sp.tasks(), [&](int64_t t) {
    int64_t b = t / sp.chunks, c = t % sp.chunks;
    Aligned<T> xt(d * npad), lwt(npad), s(2 * kTile * npad + kTile * d * W);
    transpose_keys(x + b * n * d, lw + b * n, n, d, npad, xt.p, lwt.p);
    T* dxt = partials.p + t * part;
    std::fill(dxt, dxt + part, T(0));
    backward_rows<T, D>(z + b * rows * d, g + b * rows * d, lse + b * rows, dd + b * rows, xt.p,
                        lwt.p, d, npad, sp.begin(c), sp.end(c), dz + b * rows * d, dxt,
                        dxt + d * npad, s.p);
  });
  sum_key_partials(partials.p, batch, sp.chunks, part, n, d, npad, false, dx, dlw);
}

// ---------------------------------------------------------------------------------------------
// One whole Euler step's attention for a batch: the rows are the (token, head) pairs z = A_m^T x_i
// (token-major), formed here tile by tile, and the per-token products around the rows (the
// velocity v_i = (1/M) sum_m V_m y_mi; in the backward gy = V_m^T g_i / M, D = gy . y, and the
// query, dA and dV terms) are done in the same call: nothing of size B n M d goes through XLA.

struct TokenSplit {  // tokens of each sequence in `chunks` pieces; tasks = batch * chunks
  int64_t batch, n, chunks;
  int64_t tasks() const { return batch * chunks; }
  int64_t begin(int64_t c) const { return n * c / chunks; }
  int64_t end(int64_t c) const { return n * (c + 1) / chunks; }
};

TokenSplit split_tokens(int64_t batch, int64_t n, int64_t heads, int64_t threads) {
  int64_t want = std::max<int64_t>(1, (2 * std::max<int64_t>(threads, 1) + batch - 1) / batch);
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({want, n, n * heads / 64}));
  return TokenSplit{batch, n, chunks};
}

constexpr int64_t kRowTile = 64;  // (token, head) rows formed at a time

// The small per-(token, head) products, d x d: one SIMD register per matrix row when d equals
// the vector width (the common case), plain loops otherwise.
template <class T>
inline typename Simd<T>::V load(const T* p) {
  typename Simd<T>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class T>
inline void store(T* p, typename Simd<T>::V v) {
  std::memcpy(p, &v, sizeof(v));
}

// out = scale * (c^T Mx) (+ out when accumulating): out[e] = scale * sum_k c[k] Mx[k][e]
template <class T, int D>
inline void vecmat(const T* __restrict c, const T* __restrict Mx, int64_t d_in, T scale,
                   bool accumulate, T* __restrict out) {
  typedef typename Simd<T>::V V;
  if constexpr (D == Simd<T>::W) {
    V acc = V{};
    #pragma GCC unroll 64
    for (int k = 0; k < D; ++k) acc += c[k] * load<T>(Mx + k * D);
    acc *= scale;
    store<T>(out, accumulate ? load<T>(out) + acc : acc);
  } else {
    const int64_t d = D > 0 ? D : d_in;
    for (int64_t e = 0; e < d; ++e) {
      T acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += c[k] * Mx[k * d + e];
      out[e] = accumulate ? out[e] + scale * acc : scale * acc;
    }
  }
}

// Mx += scale * a b^T
template <class T, int D>
inline void outer_add(const T* __restrict a, const T* __restrict b, int64_t d_in, T scale,
                      T* __restrict Mx) {
  if constexpr (D == Simd<T>::W) {
    const typename Simd<T>::V bv = load<T>(b) * scale;
    #pragma GCC unroll 64
    for (int k = 0; k < D; ++k) store<T>(Mx + k * D, load<T>(Mx + k * D) + a[k] * bv);
  } else {
    const int64_t d = D > 0 ? D : d_in;
    for (int64_t k = 0; k < d; ++k)
      for (int64_t e = 0; e < d; ++e) Mx[k * d + e] += scale * a[k] * b[e];
  }
}

template <class T>
std::vector<T> transposed(const T* Mx, int64_t heads, int64_t d) {  // per head, (d, d)^T
  std::vector<T> t(heads * d * d);
  for (int64_t m = 0; m < heads; ++m)
    for (int64_t a = 0; a < d; ++a)
      for (int64_t b = 0; b < d; ++b) t[(m * d + b) * d + a] = Mx[(m * d + a) * d + b];
  return t;
}

template <class T, int D>
void step_forward_batch(ffi::ThreadPool& pool, const T* x, const T* lw, const T* A, const T* V,
                        int64_t batch, int64_t n, int64_t heads, int64_t d_in, T* v, T* y,
                        T* lse) {
  constexpr int W = Simd<T>::W;
  const int64_t d = D > 0 ? D : d_in;  // compile-time for the common sizes: vectorised loops
  const int64_t npad = (n + kUnroll * W - 1) / (kUnroll * W) * (kUnroll * W);
  const int64_t tt = std::max<int64_t>(1, kRowTile / heads);  // tokens per tile
  TokenSplit sp = split_tokens(batch, n, heads, pool.num_threads());
  const std::vector<T> vt = transposed(V, heads, d);  // v_i = (1/M) sum_m y_mi^T V_m^T
  const T inv_m = T(1) / T(heads);
  parallel_tasks(pool, sp.tasks(), [&](int64_t t) {
    int64_t b = t / sp.chunks, c = t % sp.chunks;
    Aligned<T> xt(d * npad), lwt(npad), s(forward_scratch(npad, d, W)), z(tt * heads * d);
    const T* xb = x + b * n * d;
    transpose_keys(xb, lw + b * n, n, d, npad, xt.p, lwt.p);
    for (int64_t i0 = sp.begin(c); i0 < sp.end(c); i0 += tt) {
      const int64_t i1 = std::min(i0 + tt, sp.end(c));
      for (int64_t i = i0; i < i1; ++i)  // queries z_mi = A_m^T x_i
        for (int64_t m = 0; m < heads; ++m)
          vecmat<T, D>(xb + i * d, A + m * d * d, d, T(1), false, z.p + ((i - i0) * heads + m) * d);
      T* yt = y + (b * n + i0) * heads * d;
      forward_rows<T, D>(z.p, xt.p, lwt.p, d, npad, 0, (i1 - i0) * heads, s.p, yt,
                         lse + (b * n + i0) * heads);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t m = 0; m < heads; ++m)
          vecmat<T, D>(yt + ((i - i0) * heads + m) * d, vt.data() + m * d * d, d, inv_m, m > 0,
                       v + (b * n + i) * d);
    }
  });
}

template <class T, int D>
void step_backward_batch(ffi::ThreadPool& pool, const T* x, const T* lw, const T* A, const T* V,
                         const T* y, const T* lse, const T* g, int64_t batch, int64_t n,
                         int64_t heads, int64_t d_in, T* dx, T* dlw, T* dA, T* dV) {
  constexpr int W = Simd<T>::W;
  const int64_t d = D > 0 ? D : d_in;
  const int64_t npad = (n + kUnroll * W - 1) / (kUnroll * W) * (kUnroll * W);
  const int64_t tt = std::max<int64_t>(1, kRowTile / heads);
  TokenSplit sp = split_tokens(batch, n, heads, pool.num_threads());
  const int64_t part = (d + 1) * npad;      // one task's key and log-weight cotangents
  const int64_t hpart = 2 * heads * d * d;  // one task's dA and dV
  Aligned<T> partials(sp.tasks() * part), hpartials(sp.tasks() * hpart);
  const T inv_m = T(1) / T(heads);
  const std::vector<T> at = transposed(A, heads, d);
  parallel_tasks(pool, sp.tasks(), [&](int64_t t) {
    int64_t b = t / sp.chunks, c = t % sp.chunks;
    const int64_t rt = tt * heads;
    Aligned<T> xt(d * npad), lwt(npad), s(2 * kTile * npad + kTile * d * W);
    Aligned<T> z(rt * d), gy(rt * d), dd(rt), dz(rt * d);
    const T* xb = x + b * n * d;
    transpose_keys(xb, lw + b * n, n, d, npad, xt.p, lwt.p);
    T* dxt = partials.p + t * part;
    std::fill(dxt, dxt + part, T(0));
    T* dAt = hpartials.p + t * hpart;
    T* dVt = dAt + heads * d * d;
    std::fill(dAt, dAt + hpart, T(0));
    for (int64_t i0 = sp.begin(c); i0 < sp.end(c); i0 += tt) {
      const int64_t i1 = std::min(i0 + tt, sp.end(c));
      const int64_t rows = (i1 - i0) * heads;
      const T* yt = y + (b * n + i0) * heads * d;
      for (int64_t i = i0; i < i1; ++i) {
        const T* gi = g + (b * n + i) * d;
        for (int64_t m = 0; m < heads; ++m) {  // z = A_m^T x_i, gy = V_m^T g_i / M, D = gy . y
          const int64_t r = (i - i0) * heads + m;
          vecmat<T, D>(xb + i * d, A + m * d * d, d, T(1), false, z.p + r * d);
          vecmat<T, D>(gi, V + m * d * d, d, inv_m, false, gy.p + r * d);
          T dot = 0;
          for (int64_t k = 0; k < d; ++k) dot += gy.p[r * d + k] * yt[r * d + k];
          dd.p[r] = dot;
        }
      }
      backward_rows<T, D>(z.p, gy.p, lse + (b * n + i0) * heads, dd.p, xt.p, lwt.p, d, npad, 0,
                          rows, dz.p, dxt, dxt + d * npad, s.p);
      for (int64_t i = i0; i < i1; ++i) {  // query role of x_i, dA and dV
        const T* xi = xb + i * d;
        const T* gi = g + (b * n + i) * d;
        T* dxi = dx + (b * n + i) * d;
        for (int64_t m = 0; m < heads; ++m) {
          const int64_t r = (i - i0) * heads + m;
          const T* dzr = dz.p + r * d;
          vecmat<T, D>(dzr, at.data() + m * d * d, d, T(1), m > 0, dxi);  // A_m dz
          outer_add<T, D>(xi, dzr, d, T(1), dAt + m * d * d);              // x_i dz^T
          outer_add<T, D>(gi, yt + r * d, d, inv_m, dVt + m * d * d);      // g_i y^T / M
        }
      }
    }
  });
  sum_key_partials(partials.p, batch, sp.chunks, part, n, d, npad, true, dx, dlw);
  std::fill(dA, dA + heads * d * d, T(0));
  std::fill(dV, dV + heads * d * d, T(0));
  for (int64_t t = 0; t < sp.tasks(); ++t) {
    const T* h = hpartials.p + t * hpart;
    for (int64_t a = 0; a < heads * d * d; ++a) {
      dA[a] += h[a];
      dV[a] += h[heads * d * d + a];
    }
  }
}

template <class T, template <class, int> class Fn, class... Args>
bool dispatch_d(int64_t d, Args&&... args) {
  switch (d) {
    case 2: Fn<T, 2>::run(args...); return true;
    case 4: Fn<T, 4>::run(args...); return true;
    case 8: Fn<T, 8>::run(args...); return true;
    case 16: Fn<T, 16>::run(args...); return true;
    case 32: Fn<T, 32>::run(args...); return true;
    default:
      if (d < 1 || d > kMaxD) return false;
      Fn<T, 0>::run(args...);
      return true;
  }
}

template <class T, int D> struct Forward {
  template <class... A> static void run(A&&... a) { forward_batch<T, D>(a...); }
};
template <class T, int D> struct Backward {
  template <class... A> static void run(A&&... a) { backward_batch<T, D>(a...); }
};

template <class T, int D> struct StepForward {
  template <class... A> static void run(A&&... a) { step_forward_batch<T, D>(a...); }
};
template <class T, int D> struct StepBackward {
  template <class... A> static void run(A&&... a) { step_backward_batch<T, D>(a...); }
};

// Leading dimensions of z (..., R, d), x (..., n, d) are one batch axis of their product.
struct Shape {
  int64_t batch, rows, n, d;
};

template <class Dims>
std::optional<Shape> batch_shape(const Dims& zd, const Dims& xd) {
  if (zd.size() < 2 || zd.size() != xd.size()) return std::nullopt;
  const size_t r = zd.size();
  int64_t batch = 1;
  for (size_t a = 0; a + 2 < r; ++a) {
    if (zd[a] != xd[a]) return std::nullopt;
    batch *= zd[a];
  }
  if (zd[r - 1] != xd[r - 1]) return std::nullopt;
  return Shape{batch, zd[r - 2], xd[r - 2], zd[r - 1]};
}

template <ffi::DataType DT>
ffi::Error forward_impl(ffi::ThreadPool pool, ffi::Buffer<DT> z, ffi::Buffer<DT> x,
                        ffi::Buffer<DT> lw, ffi::ResultBuffer<DT> y, ffi::ResultBuffer<DT> lse) {
  typedef ffi::NativeType<DT> T;
  auto s = batch_shape(z.dimensions(), x.dimensions());
  if (!s) return ffi::Error::InvalidArgument("flash forward: expected z (..., R, d), x (..., n, d)");
  if (!dispatch_d<T, Forward>(s->d, pool, z.typed_data(), x.typed_data(), lw.typed_data(),
                              s->batch, s->rows, s->n, s->d, y->typed_data(), lse->typed_data()))
    return ffi::Error::InvalidArgument("flash forward: d must be in [1, 64]");
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error backward_impl(ffi::ThreadPool pool, ffi::Buffer<DT> z, ffi::Buffer<DT> x,
                         ffi::Buffer<DT> lw, ffi::Buffer<DT> lse, ffi::Buffer<DT> g,
                         ffi::Buffer<DT> dd, ffi::ResultBuffer<DT> dz, ffi::ResultBuffer<DT> dx,
                         ffi::ResultBuffer<DT> dlw) {
  typedef ffi::NativeType<DT> T;
  auto s = batch_shape(z.dimensions(), x.dimensions());
  if (!s) return ffi::Error::InvalidArgument("flash backward: expected z (..., R, d), x (..., n, d)");
  if (!dispatch_d<T, Backward>(s->d, pool, z.typed_data(), x.typed_data(), lw.typed_data(),
                               lse.typed_data(), g.typed_data(), dd.typed_data(), s->batch,
                               s->rows, s->n, s->d, dz->typed_data(), dx->typed_data(),
                               dlw->typed_data()))
    return ffi::Error::InvalidArgument("flash backward: d must be in [1, 64]");
  return ffi::Error::Success();
}

// x (B, n, d), lw (B, n), A and V (M, d, d).
template <class Dims>
std::optional<Shape> step_shape(const Dims& xd, const Dims& ad, const Dims& vd) {
  if (xd.size() != 3 || ad.size() != 3 || vd.size() != 3) return std::nullopt;
  if (ad[1] != xd[2] || ad[2] != xd[2] || vd[0] != ad[0] || vd[1] != xd[2] || vd[2] != xd[2])
    return std::nullopt;
  return Shape{xd[0], ad[0], xd[1], xd[2]};  // rows holds the number of heads
}

template <ffi::DataType DT>
ffi::Error step_forward_impl(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> lw,
                             ffi::Buffer<DT> A, ffi::Buffer<DT> V, ffi::ResultBuffer<DT> v,
                             ffi::ResultBuffer<DT> y, ffi::ResultBuffer<DT> lse) {
  typedef ffi::NativeType<DT> T;
  auto s = step_shape(x.dimensions(), A.dimensions(), V.dimensions());
  if (!s) return ffi::Error::InvalidArgument("step forward: expected x (B, n, d), A, V (M, d, d)");
  if (!dispatch_d<T, StepForward>(s->d, pool, x.typed_data(), lw.typed_data(), A.typed_data(),
                                  V.typed_data(), s->batch, s->n, s->rows, s->d, v->typed_data(),
                                  y->typed_data(), lse->typed_data()))
    return ffi::Error::InvalidArgument("step forward: d must be in [1, 64]");
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error step_backward_impl(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> lw,
                              ffi::Buffer<DT> A, ffi::Buffer<DT> V, ffi::Buffer<DT> y,
                              ffi::Buffer<DT> lse, ffi::Buffer<DT> g, ffi::ResultBuffer<DT> dx,
                              ffi::ResultBuffer<DT> dlw, ffi::ResultBuffer<DT> dA,
                              ffi::ResultBuffer<DT> dV) {
  typedef ffi::NativeType<DT> T;
  auto s = step_shape(x.dimensions(), A.dimensions(), V.dimensions());
  if (!s) return ffi::Error::InvalidArgument("step backward: expected x (B, n, d), A, V (M, d, d)");
  if (!dispatch_d<T, StepBackward>(s->d, pool, x.typed_data(), lw.typed_data(), A.typed_data(),
                                   V.typed_data(), y.typed_data(), lse.typed_data(),
                                   g.typed_data(), s->batch, s->n, s->rows, s->d,
                                   dx->typed_data(), dlw->typed_data(), dA->typed_data(),
                                   dV->typed_data()))
    return ffi::Error::InvalidArgument("step backward: d must be in [1, 64]");
  return ffi::Error::Success();
}

// `reps` times x <- exp(-|x|), elementwise, on a float32 array, with the kernels' own exp and on
// the pool: how fast this CPU evaluates the exps of a softmax (the benchmarks' roofline takes the
// faster of this and XLA's exp).
ffi::Error exp_rate_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::ResultBuffer<ffi::F32> y, int64_t reps) {
  typedef Simd<float>::V V;
  constexpr int W = Simd<float>::W;
  const int64_t size = x.element_count();
  const int64_t vecs = size / W;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), vecs / 1024));
  const float* in = x.typed_data();
  float* out = y->typed_data();
  parallel_tasks(pool, tasks, [&](int64_t t) {
    for (int64_t v = vecs * t / tasks; v < vecs * (t + 1) / tasks; v += 8) {
      const int64_t m = std::min<int64_t>(8, vecs * (t + 1) / tasks - v);
      V a[8];
      for (int64_t u = 0; u < m; ++u) a[u] = load<float>(in + (v + u) * W);
      for (int64_t r = 0; r < reps; ++r)
        for (int64_t u = 0; u < 8; ++u) a[u] = vexp(a[u] < 0 ? a[u] : -a[u]);
      for (int64_t u = 0; u < m; ++u) store<float>(out + (v + u) * W, a[u]);
    }
  });
  for (int64_t i = vecs * W; i < size; ++i) {
    float a = in[i];
    for (int64_t r = 0; r < reps; ++r) a = std::exp(-std::fabs(a));
    out[i] = a;
  }
  return ffi::Error::Success();
}

}  // namespace

#define MFT_FORWARD(NAME, DT)                                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, forward_impl<DT>,                                    \
                                ffi::Ffi::Bind()                                           \
                                    .Ctx<ffi::ThreadPool>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>());
#define MFT_BACKWARD(NAME, DT)                                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, backward_impl<DT>,                                   \
                                ffi::Ffi::Bind()                                           \
                                    .Ctx<ffi::ThreadPool>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>());

MFT_FORWARD(mft_flash_forward_f32, ffi::F32)
MFT_FORWARD(mft_flash_forward_f64, ffi::F64)
MFT_BACKWARD(mft_flash_backward_f32, ffi::F32)
MFT_BACKWARD(mft_flash_backward_f64, ffi::F64)

#define MFT_STEP_FORWARD(NAME, DT)                                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, step_forward_impl<DT>,                               \
                                ffi::Ffi::Bind()                                           \
                                    .Ctx<ffi::ThreadPool>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>());
#define MFT_STEP_BACKWARD(NAME, DT)                                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, step_backward_impl<DT>,                              \
                                ffi::Ffi::Bind()                                           \
                                    .Ctx<ffi::ThreadPool>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Arg<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>()                                \
                                    .Ret<ffi::Buffer<DT>>());

MFT_STEP_FORWARD(mft_step_forward_f32, ffi::F32)
MFT_STEP_FORWARD(mft_step_forward_f64, ffi::F64)
MFT_STEP_BACKWARD(mft_step_backward_f32, ffi::F32)
MFT_STEP_BACKWARD(mft_step_backward_f64, ffi::F64)

XLA_FFI_DEFINE_HANDLER_SYMBOL(mft_exp_rate_f32, exp_rate_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("reps"));
