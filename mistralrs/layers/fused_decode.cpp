// One Llama-family decoder layer (pre-norm attention + gated SiLU MLP) run from C++ as the same sequence of ATen
// calls that the Python modules make (mistralrs/models/llama.py, layers/{norm,rotary,attention,activation}.py and
// the linear methods), so that the results are bit for bit those of the plain path. Only the Python interpreter's
// work between the calls goes away: at decode sizes each layer is ~40 small kernels and 4 weight-only matmuls,
// and the interpreter costs about as much as the small kernels. Loaded by mistralrs/layers/fused_decode.py.
#include <torch/extension.h>

#include <optional>
#include <vector>

using at::Tensor;

namespace {

// How a linear layer computes `x @ W^T + b` (the kinds of mistralrs/layers/fused_decode.py LinearKind).
enum LinearKind : int64_t { kDense = 0, kInt4 = 1, kInt4Pair = 2 };

// One linear layer: a dense weight (at::linear, as F.linear) or torch's CPU int4 packing (mistralrs/quant/cpu_int4.py).
struct LinearPlan {
  int64_t kind = kDense;
  int64_t group_size = 0;    // int4 kinds: inputs per (scale, zero) pair
  int64_t out_features = 0;  // int4 kinds: rows beyond it are padding and dropped
  Tensor weight;             // dense [out, in], or packed uint8 codes
  Tensor scales_and_zeros;   // int4 kinds: [K / group_size, padded_out, 2]
  Tensor bias;               // undefined when the layer has none

  Tensor operator()(const Tensor& x) const {
    if (kind == kDense) {
      return at::linear(x, weight, bias.defined() ? std::optional<Tensor>(bias) : std::nullopt);
    }
    Tensor rows = x.reshape({-1, x.size(-1)});
    if (kind == kInt4Pair) {  // Int4CpuPairWeight.kernel_input: each sub-block fed as 16 x then x
      Tensor sub_blocks = rows.reshape({rows.size(0), -1, group_size / 2});
      rows = at::cat({sub_blocks * 16, sub_blocks}, -1).reshape({rows.size(0), -1});
    }
    Tensor y = at::_weight_int4pack_mm_for_cpu(rows.contiguous(), weight, group_size, scales_and_zeros);
    if (y.size(-1) != out_features) y = y.slice(1, 0, out_features);
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = out_features;
    y = y.reshape(shape);
    return bias.defined() ? y + bias : y;
  }
};

// RMSNorm as mistralrs/layers/norm.py computes it: rms_norm in float32, layer_norm over [x, -x] otherwise.
struct NormPlan {
  Tensor weight;   // [hidden]
  Tensor doubled;  // cat(weight, weight), for half-precision inputs
  double eps = 0.0;

  Tensor operator()(const Tensor& x) const {
    const int64_t hidden = weight.size(0);
    if (x.scalar_type() == at::kFloat) return at::rms_norm(x, {hidden}, weight, eps);
    Tensor mirrored = at::cat({x, x.neg()}, -1);
    return at::layer_norm(mirrored, {2 * hidden}, doubled, {}, eps).slice(-1, 0, hidden);
  }
};

// apply_rotary of mistralrs/layers/rotary.py: NeoX rotate-half with the sign folded into `sin`.
Tensor apply_rotary(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t rotary_dim = cos.size(-1), head_dim = x.size(-1);
  if (rotary_dim < head_dim) {
    Tensor rotated = apply_rotary(x.slice(-1, 0, rotary_dim), cos, sin);
    return at::cat({rotated, x.slice(-1, rotary_dim, head_dim)}, -1);
  }
  const int64_t half = rotary_dim / 2;
  Tensor swapped = at::cat({x.slice(-1, half, rotary_dim), x.slice(-1, 0, half)}, -1);
  return at::addcmul(x * cos, swapped, sin);
}

// The step's paged-attention inputs (the ForwardBatch fields PagedAttention reads).
struct AttentionStep {
  const Tensor& slot_mapping;
  int64_t contiguous_start;  // -1: gather through gather_indices
  const std::optional<Tensor>& gather_indices;
  const std::optional<Tensor>& mask;
  const std::optional<Tensor>& query_pad_indices;
  int64_t num_seqs, max_query_len, max_context_len;
};

struct DecoderLayerPlan {
  NormPlan input_norm, post_attention_norm;
  LinearPlan qkv, o, gate_up, down;
  int64_t num_heads, num_kv_heads, head_dim;
  double scale;

  // PagedAttention.forward with the "sdpa" backend: write the new K/V, then attend over each context.
  Tensor attend(Tensor q, const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                const AttentionStep& step) const {
    k_cache.index_copy_(0, step.slot_mapping, k);
    v_cache.index_copy_(0, step.slot_mapping, v);
    const int64_t num_seqs = step.num_seqs, max_q = step.max_query_len, max_ctx = step.max_context_len;
    Tensor keys, values;
    if (step.contiguous_start >= 0) {
      keys = k_cache.slice(0, step.contiguous_start, step.contiguous_start + max_ctx);
      values = v_cache.slice(0, step.contiguous_start, step.contiguous_start + max_ctx);
    } else {
      keys = k_cache.index_select(0, *step.gather_indices);
      values = v_cache.index_select(0, *step.gather_indices);
    }
    keys = keys.view({num_seqs, max_ctx, num_kv_heads, head_dim}).transpose(1, 2);
    values = values.view({num_seqs, max_ctx, num_kv_heads, v_cache.size(-1)}).transpose(1, 2);
    if (step.query_pad_indices) {
      Tensor padded = at::zeros({num_seqs * max_q, num_heads, head_dim}, q.options());
      q = padded.index_copy_(0, *step.query_pad_indices, q);
    }
    Tensor queries = q.view({num_seqs, max_q, num_heads, head_dim}).transpose(1, 2);
    Tensor out = at::scaled_dot_product_attention(queries, keys, values, step.mask, 0.0, false, scale,
                                                  num_kv_heads != num_heads);
    out = out.transpose(1, 2).reshape({num_seqs * max_q, num_heads * head_dim});
    if (step.query_pad_indices) out = out.index_select(0, *step.query_pad_indices);
    return out;
  }

  // LlamaDecoderLayer.forward: h += attn(norm(h)); h += mlp(norm(h)).
  Tensor forward(const Tensor& hidden, const Tensor& cos, const Tensor& sin, Tensor k_cache, Tensor v_cache,
                 const Tensor& slot_mapping, int64_t contiguous_start, const std::optional<Tensor>& gather_indices,
                 const std::optional<Tensor>& mask, const std::optional<Tensor>& query_pad_indices,
                 int64_t num_seqs, int64_t max_query_len, int64_t max_context_len) const {
    const int64_t num_tokens = hidden.size(0), rotated_heads = num_heads + num_kv_heads;
    Tensor qkv_out = qkv(input_norm(hidden)).view({num_tokens, rotated_heads + num_kv_heads, head_dim});
    Tensor rotated = apply_rotary(qkv_out.slice(1, 0, rotated_heads), cos, sin);
    Tensor v = qkv_out.slice(1, rotated_heads, rotated_heads + num_kv_heads);
    AttentionStep step{slot_mapping, contiguous_start, gather_indices, mask, query_pad_indices,
                       num_seqs, max_query_len, max_context_len};
    Tensor attended = attend(rotated.slice(1, 0, num_heads), rotated.slice(1, num_heads, rotated_heads), v,
                             k_cache, v_cache, step);
    Tensor h = hidden + o(attended);
    std::vector<Tensor> gate_and_up = gate_up(post_attention_norm(h)).chunk(2, -1);
    return h + down(at::silu(gate_and_up[0]) * gate_and_up[1]);
  }
};

LinearPlan make_linear(int64_t kind, int64_t group_size, int64_t out_features, Tensor weight,
                       std::optional<Tensor> scales_and_zeros, std::optional<Tensor> bias) {
  TORCH_CHECK(kind == kDense || kind == kInt4 || kind == kInt4Pair, "unknown linear kind ", kind);
  LinearPlan plan;
  plan.kind = kind;
  plan.group_size = group_size;
  plan.out_features = out_features;
  plan.weight = std::move(weight);
  if (scales_and_zeros) plan.scales_and_zeros = *scales_and_zeros;
  if (bias) plan.bias = *bias;
  return plan;
}

NormPlan make_norm(Tensor weight, std::optional<Tensor> doubled, double eps) {
  NormPlan plan;
  plan.weight = std::move(weight);
  if (doubled) plan.doubled = *doubled;
  plan.eps = eps;
  return plan;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<LinearPlan>(m, "LinearPlan");
  py::class_<NormPlan>(m, "NormPlan");
  m.def("make_linear", &make_linear);
  m.def("make_norm", &make_norm);
  py::class_<DecoderLayerPlan>(m, "DecoderLayerPlan")
      .def(py::init([](NormPlan input_norm, NormPlan post_attention_norm, LinearPlan qkv, LinearPlan o,
                       LinearPlan gate_up, LinearPlan down, int64_t num_heads, int64_t num_kv_heads,
                       int64_t head_dim, double scale) {
        return DecoderLayerPlan{input_norm, post_attention_norm, qkv, o, gate_up, down,
                                num_heads, num_kv_heads, head_dim, scale};
      }))
      .def("forward", &DecoderLayerPlan::forward, py::call_guard<py::gil_scoped_release>());
}
