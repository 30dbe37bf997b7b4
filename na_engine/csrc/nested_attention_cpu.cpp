// Nested attention for one cross-attention layer on the CPU, fp32, in one pass over the queries.
//
// Built on first use by na_engine/cpu_kernel.py (torch.utils.cpp_extension, -mavx2 -mfma -fopenmp);
// without a compiler the engine falls back to its PyTorch paths.  Registered as
// torch.ops.nested_attention.forward.
//
// Per (batch row b, head h, block of queries):
//   S = q K^T                     (rows, L)  the text keys, then each subject's nested keys K~
//   text part:    p = softmax(S[:, text] + sum_s log(weight_s(q)) [j in J_s])   (trigger weights; 1 = none)
//   subject s:    P_s = gate_s(q) * sum_{j in J_s} p_j          (J_s: its trigger positions)
//                 w_s = P_s * softmax(S[:, nested_s])
//                 p_j <- p_j * (1 - sum_s gate_s(q) [j in J_s])
//   out = [p, w_1, w_2, ...] @ [V ; V~_1 ; V~_2 ; ...]
// which is attn(q, K, V) + sum_s gate_s sum_{j in J_s} p_j (u_s(q) - v_j), the closed form, for any
// strength.  The whole key set of one query block stays in cache: nothing of size N x L leaves it.
//
// Column layout (L columns, every boundary a multiple of 8): text [0, Tp), then subject s at
// [starts[s], ends[s]).  Padding columns have zero keys and values and bias -inf.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));

inline v8 load(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline void store(float* p, v8 x) { *reinterpret_cast<v8*>(p) = x; }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline float hmax(v8 x) {
  float m = x[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, x[i]);
  return m;
}
inline float hsum(v8 x) { return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7])); }

// exp(x) on 8 lanes for x <= 0: Cephes' expf polynomial on x - n ln2, times 2^n; exactly 0 below -87.
inline v8 exp8(v8 x) {
  const v8 low = splat(-87.f);
  const v8 xc = x < low ? low : x;
  const v8 n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const v8 r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  v8 p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  const v8 e = p * reinterpret_cast<const v8&>(bits);
  return x < low ? splat(0.f) : e;
}

// x[0, 8 nv) <- exp(x + bias - max); returns the sum.
inline float exp_shifted(float* x, const float* bias, int64_t nv) {
  v8 mx = splat(-3.0e38f);
  for (int64_t i = 0; i < nv; ++i) {
    const v8 y = load(x + 8 * i) + load(bias + 8 * i);
    store(x + 8 * i, y);
    mx = y > mx ? y : mx;
  }
  const v8 m = splat(hmax(mx));
  v8 sum = {};
  for (int64_t i = 0; i < nv; ++i) {
    const v8 e = exp8(load(x + 8 * i) - m);
    store(x + 8 * i, e);
    sum += e;
  }
  return hsum(sum);
}

// C[R x 8V] = A[R x K] @ B[K x 8V], K >= 1; rows of A, B and C at strides lda, ldb, ldc.
template <int R, int V>
inline void tile(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  v8 acc[R][V];
  for (int j = 0; j < V; ++j) {
    const v8 bv = load(b + 8 * j);
    for (int r = 0; r < R; ++r) acc[r][j] = a[r * lda] * bv;
  }
  for (int64_t i = 1; i < K; ++i) {
    v8 bv[V];
    for (int j = 0; j < V; ++j) bv[j] = load(b + i * ldb + 8 * j);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * lda + i];
      for (int j = 0; j < V; ++j) acc[r][j] += x * bv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) store(c + r * ldc + 8 * j, acc[r][j]);
}

template <int R>
inline void row_tiles(int64_t n, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) tile<R, 2>(K, a, lda, b + j, ldb, c + j, ldc);
  if (j < n) tile<R, 1>(K, a, lda, b + j, ldb, c + j, ldc);
}

// C[m x n] = A[m x K] @ B[K x n], n a multiple of 8.  Tiles of 6 rows x 16 columns keep
// 12 accumulators in the 16 AVX registers.
void matmul(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t r = 0;
  for (; r + 6 <= m; r += 6) row_tiles<6>(n, K, a + r * lda, lda, b, ldb, c + r * ldc, ldc);
  for (; r < m; ++r) row_tiles<1>(n, K, a + r * lda, lda, b, ldb, c + r * ldc, ldc);
}

// One row of S (in place) -> the coefficients [p, w_1, ...] of that query.
void coefficients(float* row, const float* bias, int64_t text, const int64_t* starts, const int64_t* ends, int64_t subjects,
                  const float* const* trigger, const float* gate, const float* weight, float* factor, float* mass) {
  float total = exp_shifted(row, bias, text / 8);
  bool weighted = false;
  for (int64_t s = 0; s < subjects; ++s) weighted |= weight[s] != 1.f;
  if (weighted) {  // row <- row * prod_s (1 + (weight_s - 1) [j in J_s]), and its new sum
    std::fill(factor, factor + text, 1.f);
    for (int64_t s = 0; s < subjects; ++s) {
      const v8 excess = splat(weight[s] - 1.f);
      for (int64_t i = 0; i < text; i += 8)
        store(factor + i, load(factor + i) * (splat(1.f) + excess * load(trigger[s] + i)));
    }
    v8 sum = {};
    for (int64_t i = 0; i < text; i += 8) {
      store(row + i, load(row + i) * load(factor + i));
      sum += load(row + i);
    }
    total = hsum(sum);
  }
  const float inv = 1.f / total;
  std::fill(factor, factor + text, inv);
  for (int64_t s = 0; s < subjects; ++s) {
    v8 pj = {};
    for (int64_t i = 0; i < text; i += 8) {
      pj += load(trigger[s] + i) * load(row + i);
      store(factor + i, load(factor + i) - (gate[s] * inv) * load(trigger[s] + i));
    }
    mass[s] = gate[s] * inv * hsum(pj);
  }
  for (int64_t i = 0; i < text; i += 8) store(row + i, load(row + i) * load(factor + i));
  for (int64_t s = 0; s < subjects; ++s) {
    float* seg = row + starts[s];
    const int64_t nv = (ends[s] - starts[s]) / 8;
    const v8 f = splat(mass[s] / exp_shifted(seg, bias + starts[s], nv));
    for (int64_t i = 0; i < nv; ++i) store(seg + 8 * i, load(seg + 8 * i) * f);
  }
}

}  // namespace

// q (B, N, H*d), last dim contiguous; keys_t (B, H, d, L): scaled keys, transposed; values (B, H, L, dv),
// dv >= d a multiple of 8, zero past d; bias (L): 0, or -inf on padding; trigger (S, B, Tp): 1 at subject
// s's trigger positions in row b; gate (S, B, N): strength * query mask; weight (S, B, N): the trigger
// weight where the subject acts, 1 + (w - 1) * query mask.  Returns (B, N, H*dv).
at::Tensor forward(const at::Tensor& q, const at::Tensor& keys_t, const at::Tensor& values, const at::Tensor& bias,
                   int64_t text, const at::Tensor& starts, const at::Tensor& ends, const at::Tensor& trigger,
                   const at::Tensor& gate, const at::Tensor& weight, int64_t block) {
  const int64_t B = q.size(0), N = q.size(1), H = keys_t.size(1), d = keys_t.size(2), L = keys_t.size(3), dv = values.size(3);
  const int64_t S = starts.numel();
  for (const at::Tensor* t : {&q, &keys_t, &values, &bias, &trigger, &gate, &weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "nested_attention.forward: fp32 CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && q.size(2) == H * d && q.stride(2) == 1, "q must be (B, N, H*d) with a contiguous last dim");
  TORCH_CHECK(keys_t.is_contiguous() && values.is_contiguous() && bias.is_contiguous() && trigger.is_contiguous() && gate.is_contiguous() &&
                  weight.is_contiguous(),
              "keys_t, values, bias, trigger, gate and weight must be contiguous");
  TORCH_CHECK(keys_t.size(0) == B && values.sizes() == at::IntArrayRef({B, H, L, dv}) && bias.numel() == L, "keys/values/bias shapes");
  TORCH_CHECK(dv % 8 == 0 && dv >= d && L % 8 == 0 && text % 8 == 0 && text <= L && block > 0, "widths must be multiples of 8");
  TORCH_CHECK(trigger.sizes() == at::IntArrayRef({S, B, text}) && gate.sizes() == at::IntArrayRef({S, B, N}) &&
                  weight.sizes() == gate.sizes(), "trigger/gate/weight shapes");
  TORCH_CHECK(ends.numel() == S && starts.scalar_type() == at::kLong && ends.scalar_type() == at::kLong, "starts/ends");
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* ep = ends.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(sp[s] >= text && sp[s] % 8 == 0 && ep[s] % 8 == 0 && sp[s] < ep[s] && ep[s] <= L, "subject columns");

  auto out = at::empty({B, N, H * dv}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = keys_t.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* tp = trigger.data_ptr<float>();
  const float* gp = gate.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (N + block - 1) / block;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(block * L), factor(text), mass(S), gates(S), weights(S);
    std::vector<const float*> trig(S);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (H * blocks), h = (task / blocks) % H, n0 = (task % blocks) * block;
      const int64_t rows = std::min(block, N - n0);
      for (int64_t s = 0; s < S; ++s) trig[s] = tp + (s * B + b) * text;
      matmul(rows, L, d, qp + b * q.stride(0) + n0 * q.stride(1) + h * d, q.stride(1), kp + (b * H + h) * d * L, L,
             logits.data(), L);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t s = 0; s < S; ++s) {
          gates[s] = gp[(s * B + b) * N + n0 + r];
          weights[s] = wp[(s * B + b) * N + n0 + r];
        }
        coefficients(logits.data() + r * L, bp, text, sp, ep, S, trig.data(), gates.data(), weights.data(), factor.data(),
                     mass.data());
      }
      matmul(rows, dv, L, logits.data(), L, vp + (b * H + h) * L * dv, dv, op + (b * N + n0) * H * dv + h * dv, H * dv);
    }
  });
  return out;
}

TORCH_LIBRARY(nested_attention, m) {
  m.def("forward(Tensor q, Tensor keys_t, Tensor values, Tensor bias, int text, Tensor starts, Tensor ends, "
        "Tensor trigger, Tensor gate, Tensor weight, int block) -> Tensor");
  m.impl("forward", at::kCPU, &forward);
}
