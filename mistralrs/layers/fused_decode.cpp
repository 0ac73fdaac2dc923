// One Llama- or Gemma-family decoder layer (pre-norm attention + gated MLP; Gemma's (1 + w) norms, optional
// sandwich norms, per-head q/k norms, tanh-gelu and soft-capped attention) run from C++ as the same sequence of
// ATen calls that the Python modules make (mistralrs/models/{llama,gemma}.py,
// layers/{norm,rotary,attention,activation}.py and the linear methods), so that the results are bit for bit those
// of the plain path. Only the Python interpreter's work between the calls goes away: at decode sizes each layer
// is ~40 small kernels and 4 weight-only matmuls, and the interpreter costs about as much as the small kernels.
// A decode step may instead take `native_forward`: the small kernels replaced by the loops of native_decode.h and
// the int8 dot-product kernels called on float32 buffers (within a tolerance of the ATen calls, not bit for bit).
// Loaded by mistralrs/layers/fused_decode.py.
#include <torch/extension.h>

#include "native_decode.h"
#include "qdot/qdot.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

using at::Tensor;
using native_decode::kGeluTanh;
using native_decode::kSilu;
using native_decode::Rounding;

namespace {

// How one weight of a linear layer computes `x @ W^T` (the kinds of mistralrs/quant/packed.py LinearKind).
enum LinearKind : int64_t { kDense = 0, kInt4 = 1, kInt4Pair = 2, kQdot = 3 };

// One packed weight: a dense matrix (at::linear, as F.linear), torch's CPU int4 packing
// (mistralrs/quant/cpu_int4.py Int4CpuWeight.matmul), or GGML blocks multiplied by the quantized dot products of
// qdot/qdot.h (mistralrs/quant/qdot.py QdotWeight.matmul), packed by qdot::pack.
struct LinearPart {
  int64_t kind = kDense;
  int64_t group_size = 0;    // int4 kinds: inputs per (scale, zero) pair; kQdot: the GGML type number
  int64_t out_features = 0;  // int4 kinds: rows beyond it are padding and dropped
  Tensor weight;             // dense [out, in], packed uint8 codes, or qdot::pack's layout of GGML blocks
  Tensor scales_and_zeros;   // int4 kinds: [K / group_size, padded_out, 2]

  Tensor operator()(const Tensor& x, const std::optional<Tensor>& bias) const {
    if (kind == kDense) return at::linear(x, weight, bias);
    Tensor rows = x.reshape({-1, x.size(-1)});
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = out_features;
    if (kind == kQdot) {
      Tensor y = qdot::matmul(rows, weight, group_size, out_features, -1, -1).reshape(shape);
      return bias ? y + *bias : y;
    }
    if (kind == kInt4Pair) {  // Int4CpuPairWeight.kernel_input: each sub-block fed as 16 x then x
      Tensor sub_blocks = rows.reshape({rows.size(0), -1, group_size / 2});
      rows = at::cat({sub_blocks * 16, sub_blocks}, -1).reshape({rows.size(0), -1});
    }
    Tensor y = at::_weight_int4pack_mm_for_cpu(rows.contiguous(), weight, group_size, scales_and_zeros);
    if (y.size(-1) != out_features) y = y.slice(1, 0, out_features);
    y = y.reshape(shape);
    return bias ? y + *bias : y;
  }
};

// One linear layer as its quant method computes it: one dense weight with the bias fused into at::linear; one
// int4 weight then `+ bias`; several weights (shards of different types) concatenated along the outputs, then
// `+ bias` (GGUFLinearMethod.apply / IsqLinearMethod.apply).
struct LinearPlan {
  std::vector<LinearPart> parts;
  std::optional<Tensor> bias;  // none when the layer has no bias

  Tensor operator()(const Tensor& x) const {
    if (parts.size() == 1) return parts[0](x, bias);
    std::vector<Tensor> outputs;
    outputs.reserve(parts.size());
    for (const LinearPart& part : parts) outputs.push_back(part(x, std::nullopt));
    Tensor y = at::cat(outputs, -1);
    return bias ? y + *bias : y;
  }

  // The native decode step's form: float32 rows x [M, K] holding values of `dtype` -> contiguous float32 [M, N],
  // the values `operator()` gives on x in `dtype`. Int8 dot-product weights without a bias read x as it is (the
  // kernels quantize float32 rows; x in `dtype` holds the same values) and their float32 results, concatenated,
  // are rounded once as `store_outputs` would: no cast of x to `dtype`, none of the results and back.
  Tensor rows(const Tensor& x, at::ScalarType dtype, Rounding round) const {
    const bool int8 = !bias && x.size(0) < qdot::kDenseRows &&
                      std::all_of(parts.begin(), parts.end(), [](const LinearPart& p) { return p.kind == kQdot; });
    if (!int8) return (*this)(dtype == at::kFloat ? x : x.to(dtype)).to(at::kFloat).contiguous();
    std::vector<Tensor> outputs;
    for (const LinearPart& part : parts)
      outputs.push_back(qdot::matmul(x, part.weight, part.group_size, part.out_features, -1, -1));
    Tensor y = outputs.size() == 1 ? outputs[0] : at::cat(outputs, 1);
    round.row(y.data_ptr<float>(), y.numel());
    return y;
  }
};

// Which norm module a NormPlan reproduces (the kinds of mistralrs/layers/fused_decode.py NormKind).
enum NormKind : int64_t { kRms = 0, kGemmaRms = 1 };

// RMSNorm as mistralrs/layers/norm.py computes it: rms_norm in float32, layer_norm over [x, -x] otherwise; or
// GemmaRMSNorm: rms_norm of x in float32 with the float32 scale (1 + w), cast back to x's dtype.
struct NormPlan {
  int64_t kind = kRms;
  Tensor weight;   // [hidden]: RMSNorm's weight, or GemmaRMSNorm.scale_weight()
  Tensor doubled;  // RMSNorm: cat(weight, weight), for half-precision inputs
  double eps = 0.0;
  std::vector<float> weight_f32;  // the weight as float32, for the native decode step

  // The native decode step's form: `rows` rows of float32 values `stride` apart, normalised into y (may be x).
  void rows(const float* x, float* y, int64_t rows, int64_t stride, Rounding round) const {
    native_decode::rms_norm(x, y, rows, static_cast<int64_t>(weight_f32.size()), stride, weight_f32.data(),
                            static_cast<float>(eps), round);
  }

  Tensor operator()(const Tensor& x) const {
    const int64_t hidden = weight.size(0);
    if (kind == kGemmaRms) return at::rms_norm(x.to(at::kFloat), {hidden}, weight, eps).to(x.scalar_type());
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

// _softcapped_attention of mistralrs/layers/attention.py: explicit attention with tanh-capped float32 scores.
Tensor softcapped_attention(const Tensor& queries, Tensor keys, Tensor values, const std::optional<Tensor>& mask,
                            double scale, double softcap) {
  const int64_t group = queries.size(1) / keys.size(1);
  if (group > 1) {
    keys = keys.repeat_interleave(group, 1);
    values = values.repeat_interleave(group, 1);
  }
  Tensor scores = at::matmul(queries, keys.transpose(-1, -2)).to(at::kFloat) * scale;
  scores = at::tanh(scores / softcap) * softcap;
  if (mask) scores = scores.masked_fill(~*mask, -std::numeric_limits<double>::infinity());
  Tensor probs = scores.softmax(-1).to(values.scalar_type());
  return at::matmul(probs, values);
}

// The parts a layer may add to the Llama layout (Gemma 1/2/3); all absent for a Llama-family layer.
struct LayerOptions {
  std::optional<NormPlan> pre_feedforward_norm, post_feedforward_norm;  // sandwich norms (Gemma 2/3)
  std::optional<NormPlan> q_norm, k_norm;                               // per-head q/k norms (Gemma 3)
  bool concat_qk = false;          // RoPE over cat(q, k) (Gemma) instead of the q/k slice of qkv (Llama)
  int64_t activation = kSilu;      // of the gate
  std::optional<double> softcap;   // tanh cap on the attention scores (Gemma 2)
  int64_t sliding_window = 0;      // keys older than this many positions are not attended (0: none)
};

struct DecoderLayerPlan {
  NormPlan input_norm, post_attention_norm;
  LinearPlan qkv, o, gate_up, down;
  int64_t num_heads, num_kv_heads, head_dim;
  double scale;
  LayerOptions options;
  mutable int64_t native_steps = 0;  // steps `native_forward` ran (the tests' proof that it did)

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
    Tensor out = options.softcap
        ? softcapped_attention(queries, keys, values, step.mask, scale, *options.softcap)
        : at::scaled_dot_product_attention(queries, keys, values, step.mask, 0.0, false, scale,
                                           num_kv_heads != num_heads);
    out = out.transpose(1, 2).reshape({num_seqs * max_q, num_heads * head_dim});
    if (step.query_pad_indices) out = out.index_select(0, *step.query_pad_indices);
    return out;
  }

  // The rotated [q; k] heads: LlamaAttention rotates the q/k slice of qkv, GemmaAttention cat(q, k) of the
  // (per-head normalised) splits.
  Tensor rotate(const Tensor& qkv_out, const Tensor& cos, const Tensor& sin) const {
    const int64_t rotated_heads = num_heads + num_kv_heads;
    if (!options.concat_qk) return apply_rotary(qkv_out.slice(1, 0, rotated_heads), cos, sin);
    Tensor q = qkv_out.slice(1, 0, num_heads), k = qkv_out.slice(1, num_heads, rotated_heads);
    if (options.q_norm) {
      q = (*options.q_norm)(q);
      k = (*options.k_norm)(k);
    }
    return apply_rotary(at::cat({q, k}, 1), cos, sin);
  }

  // LlamaMLP.forward: down(act(gate) * up).
  Tensor mlp(const Tensor& x) const {
    std::vector<Tensor> gate_and_up = gate_up(x).chunk(2, -1);
    Tensor gate = options.activation == kSilu ? at::silu(gate_and_up[0]) : at::gelu(gate_and_up[0], "tanh");
    return down(gate * gate_and_up[1]);
  }

  // Whether `native_forward` can run a step: one new token per sequence (fewer than qdot::kDenseRows), float32
  // or bfloat16 activations, RoPE tables and caches of that dtype laid out as allocate_kv_caches makes them.
  bool native_step(const Tensor& hidden, const Tensor& cos, const Tensor& sin, const Tensor& k_cache,
                   const Tensor& v_cache, const AttentionStep& step, const std::vector<int64_t>& context_lens) const {
    const at::ScalarType dtype = hidden.scalar_type();
    const int64_t num_tokens = hidden.size(0);
    const auto same = [&](const Tensor& t) { return t.scalar_type() == dtype && t.is_contiguous(); };
    const bool slots = step.contiguous_start >= 0 ||
                       (step.gather_indices && step.gather_indices->scalar_type() == at::kLong &&
                        step.gather_indices->is_contiguous());
    return (dtype == at::kFloat || dtype == at::kBFloat16) && hidden.dim() == 2 && same(hidden) &&
           step.max_query_len == 1 && !step.query_pad_indices && step.num_seqs == num_tokens &&
           num_tokens < qdot::kDenseRows && static_cast<int64_t>(context_lens.size()) == num_tokens &&
           same(cos) && same(sin) && cos.numel() == num_tokens * cos.size(-1) && sin.sizes() == cos.sizes() &&
           same(k_cache) && same(v_cache) && k_cache.dim() == 3 && v_cache.size(-1) == head_dim &&
           step.slot_mapping.scalar_type() == at::kLong && step.slot_mapping.is_contiguous() && slots;
  }

  // The q/k norms (Gemma 3) and RoPE in place on each token's q and k heads of qkv rows [num_tokens, width], then
  // each token's k and v heads stored at its cache slot.
  template <class T>
  void rotate_and_store(float* qkv_rows, int64_t num_tokens, int64_t width, const Tensor& cos, const Tensor& sin,
                        Tensor& k_cache, Tensor& v_cache, const Tensor& slot_mapping, Rounding round) const {
    const int64_t rotary_dim = cos.size(-1), kv_width = num_kv_heads * head_dim;
    const bool bf16 = cos.scalar_type() == at::kBFloat16;
    const native_decode::Floats cos_rows{cos.data_ptr(), bf16}, sin_rows{sin.data_ptr(), bf16};
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    T* keys = static_cast<T*>(k_cache.data_ptr());
    T* values = static_cast<T*>(v_cache.data_ptr());
    for (int64_t t = 0; t < num_tokens; ++t) {
      float* row = qkv_rows + t * width;
      float* k = row + num_heads * head_dim;
      if (options.q_norm) {
        options.q_norm->rows(row, row, num_heads, head_dim, round);
        options.k_norm->rows(k, k, num_kv_heads, head_dim, round);
      }
      native_decode::rotate_half(row, num_heads + num_kv_heads, head_dim, cos_rows.at(t * rotary_dim),
                                 sin_rows.at(t * rotary_dim), rotary_dim, round);
      native_decode::store(keys + slots[t] * kv_width, k, kv_width);
      native_decode::store(values + slots[t] * kv_width, k + kv_width, kv_width);
    }
  }

  // The layer for a decode step (`native_step`) with hand-written loops for everything but the matmuls
  // (native_decode.h): activations in float32 buffers, rounded to the model's dtype where the ATen path stores
  // a result.
  Tensor native_forward(const Tensor& hidden, const Tensor& cos, const Tensor& sin, Tensor& k_cache,
                        Tensor& v_cache, const AttentionStep& step, const std::vector<int64_t>& context_lens) const {
    const at::ScalarType dtype = hidden.scalar_type();
    const Rounding round{dtype == at::kBFloat16};
    const int64_t num_tokens = hidden.size(0), hidden_size = hidden.size(1);
    const int64_t n = num_tokens * hidden_size;
    Tensor h = at::empty({num_tokens, hidden_size}, hidden.options().dtype(at::kFloat));  // the residual stream
    float* hp = h.data_ptr<float>();
    if (round.bf16)
      native_decode::widen(hp, hidden.data_ptr<c10::BFloat16>(), n);
    else
      std::copy(hidden.data_ptr<float>(), hidden.data_ptr<float>() + n, hp);
    Tensor normed = at::empty_like(h);
    input_norm.rows(hp, normed.data_ptr<float>(), num_tokens, hidden_size, round);
    Tensor qkv_out = qkv.rows(normed, dtype, round);  // [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
    const int64_t width = qkv_out.size(1);
    Tensor attended = at::empty({num_tokens, num_heads * head_dim}, h.options());
    const native_decode::ContextSlots slots{step.contiguous_start,
                                            step.contiguous_start >= 0 ? nullptr
                                                                       : step.gather_indices->data_ptr<int64_t>(),
                                            step.max_context_len};
    const native_decode::AttentionShape shape{num_heads, num_kv_heads, head_dim, static_cast<float>(scale),
                                              options.softcap ? static_cast<float>(*options.softcap) : 0.f,
                                              options.sliding_window};
    if (round.bf16) {
      rotate_and_store<c10::BFloat16>(qkv_out.data_ptr<float>(), num_tokens, width, cos, sin, k_cache, v_cache,
                                      step.slot_mapping, round);
      native_decode::decode_attention(qkv_out.data_ptr<float>(), width, k_cache.data_ptr<c10::BFloat16>(),
                                      v_cache.data_ptr<c10::BFloat16>(), slots, context_lens, shape,
                                      attended.data_ptr<float>(), round);
    } else {
      rotate_and_store<float>(qkv_out.data_ptr<float>(), num_tokens, width, cos, sin, k_cache, v_cache,
                              step.slot_mapping, round);
      native_decode::decode_attention(qkv_out.data_ptr<float>(), width, k_cache.data_ptr<float>(),
                                      v_cache.data_ptr<float>(), slots, context_lens, shape,
                                      attended.data_ptr<float>(), round);
    }
    Tensor projected = o.rows(attended, dtype, round);  // [num_tokens, hidden]
    float* pp = projected.data_ptr<float>();
    float* np = normed.data_ptr<float>();
    if (options.pre_feedforward_norm) {
      post_attention_norm.rows(pp, pp, num_tokens, hidden_size, round);
      native_decode::add_rounded(hp, pp, n, round);
      options.pre_feedforward_norm->rows(hp, np, num_tokens, hidden_size, round);
    } else {
      native_decode::add_rounded(hp, pp, n, round);
      post_attention_norm.rows(hp, np, num_tokens, hidden_size, round);
    }
    Tensor gate_up_out = gate_up.rows(normed, dtype, round);  // [num_tokens, 2 * intermediate]
    const int64_t intermediate = gate_up_out.size(1) / 2;
    Tensor gated = at::empty({num_tokens, intermediate}, h.options());
    native_decode::gate(gate_up_out.data_ptr<float>(), num_tokens, intermediate, options.activation,
                        gated.data_ptr<float>(), round);
    Tensor mlp_out = down.rows(gated, dtype, round);  // [num_tokens, hidden]
    float* mp = mlp_out.data_ptr<float>();
    if (options.post_feedforward_norm) options.post_feedforward_norm->rows(mp, mp, num_tokens, hidden_size, round);
    native_decode::add_rounded(hp, mp, n, round);
    if (!round.bf16) return h;
    Tensor out = at::empty({num_tokens, hidden_size}, hidden.options());  // h's values are bfloat16's already
    native_decode::store(out.data_ptr<c10::BFloat16>(), hp, n);
    return out;
  }

  // LlamaDecoderLayer.forward / GemmaDecoderLayer.forward: h += attn(norm(h)); h += mlp(norm(h)), or with
  // sandwich norms h += post_attn_norm(attn(norm(h))); h += post_ff_norm(mlp(pre_ff_norm(h))). With `native`,
  // a step that `native_step` accepts runs `native_forward`; every other step the ATen calls below.
  Tensor forward(const Tensor& hidden, const Tensor& cos, const Tensor& sin, Tensor k_cache, Tensor v_cache,
                 const Tensor& slot_mapping, int64_t contiguous_start, const std::optional<Tensor>& gather_indices,
                 const std::optional<Tensor>& mask, const std::optional<Tensor>& query_pad_indices,
                 int64_t num_seqs, int64_t max_query_len, int64_t max_context_len,
                 const std::vector<int64_t>& context_lens, bool native) const {
    AttentionStep step{slot_mapping, contiguous_start, gather_indices, mask, query_pad_indices,
                       num_seqs, max_query_len, max_context_len};
    if (native && native_step(hidden, cos, sin, k_cache, v_cache, step, context_lens)) {
      ++native_steps;
      return native_forward(hidden, cos, sin, k_cache, v_cache, step, context_lens);
    }
    const int64_t num_tokens = hidden.size(0), rotated_heads = num_heads + num_kv_heads;
    Tensor qkv_out = qkv(input_norm(hidden)).view({num_tokens, rotated_heads + num_kv_heads, head_dim});
    Tensor rotated = rotate(qkv_out, cos, sin);
    Tensor v = qkv_out.slice(1, rotated_heads, rotated_heads + num_kv_heads);
    Tensor attended = o(attend(rotated.slice(1, 0, num_heads), rotated.slice(1, num_heads, rotated_heads), v,
                               k_cache, v_cache, step));
    if (!options.pre_feedforward_norm) {
      Tensor h = hidden + attended;
      return h + mlp(post_attention_norm(h));
    }
    Tensor h = hidden + post_attention_norm(attended);
    return h + (*options.post_feedforward_norm)(mlp((*options.pre_feedforward_norm)(h)));
  }
};

LinearPart make_linear_part(int64_t kind, int64_t group_size, int64_t out_features, Tensor weight,
                            std::optional<Tensor> scales_and_zeros) {
  TORCH_CHECK(kind == kDense || kind == kInt4 || kind == kInt4Pair || kind == kQdot, "unknown linear kind ", kind);
  TORCH_CHECK(kind == kDense || kind == kQdot || scales_and_zeros, "an int4 weight needs its scales and zeros");
  LinearPart part;
  part.kind = kind;
  part.group_size = group_size;
  part.out_features = out_features;
  part.weight = std::move(weight);
  if (scales_and_zeros) part.scales_and_zeros = *scales_and_zeros;
  return part;
}

LinearPlan make_linear(std::vector<LinearPart> parts, std::optional<Tensor> bias) {
  TORCH_CHECK(!parts.empty(), "a linear layer needs at least one weight");
  return LinearPlan{std::move(parts), std::move(bias)};
}

NormPlan make_norm(int64_t kind, Tensor weight, std::optional<Tensor> doubled, double eps) {
  TORCH_CHECK(kind == kRms || kind == kGemmaRms, "unknown norm kind ", kind);
  TORCH_CHECK(kind == kGemmaRms || doubled, "an RMSNorm plan needs its doubled weight");
  NormPlan plan;
  plan.kind = kind;
  plan.weight = std::move(weight);
  if (doubled) plan.doubled = *doubled;
  plan.eps = eps;
  Tensor weight_f32 = plan.weight.to(at::kFloat).contiguous();
  plan.weight_f32.assign(weight_f32.data_ptr<float>(), weight_f32.data_ptr<float>() + weight_f32.numel());
  return plan;
}

// A test binding of an elementwise loop `loop(out, in, count, rounding)` that updates its first operand: float32
// copies in, the updated copy of `out` back.
Tensor two_operand_loop(void (*loop)(float*, const float*, int64_t, Rounding), const Tensor& out, const Tensor& in,
                        bool bf16) {
  Tensor y = out.to(at::kFloat).contiguous().clone();
  Tensor x = in.to(at::kFloat).contiguous();
  loop(y.data_ptr<float>(), x.data_ptr<float>(), y.numel(), Rounding{bf16});
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<LinearPart>(m, "LinearPart");
  py::class_<LinearPlan>(m, "LinearPlan");
  py::class_<NormPlan>(m, "NormPlan");
  m.def("make_linear_part", &make_linear_part);
  m.def("make_linear", &make_linear);
  m.def("make_norm", &make_norm);
  m.def("qdot_pack", &qdot::pack, py::arg("blocks"), py::arg("ggml_type"),
        py::call_guard<py::gil_scoped_release>());
  m.def("qdot_matmul", &qdot::matmul, py::arg("x"), py::arg("packed"), py::arg("ggml_type"),
        py::arg("out_features"), py::arg("isa") = int64_t{-1}, py::arg("dense") = int64_t{-1},
        py::call_guard<py::gil_scoped_release>());
  m.def("qdot_dequantize", &qdot::dequantize, py::arg("packed"), py::arg("ggml_type"), py::arg("rows"),
        py::arg("in_features"), py::call_guard<py::gil_scoped_release>());
  m.def("qdot_quantize_activations", &qdot::quantize_activations, py::arg("x"), py::arg("isa") = int64_t{-1});
  m.def("qdot_isas", &qdot::supported_isas);
  m.def("qdot_kquant_unpack", [](const Tensor& blocks, int64_t type, int64_t isa) {
    TORCH_CHECK(qdot::is_kquant(type), "GGML type ", type, " is not a K-quant type");
    return qdot::kquant_unpack(blocks, type, qdot::checked_isa(isa));
  }, py::arg("blocks"), py::arg("ggml_type"), py::arg("isa") = int64_t{-1});
  m.def("qdot_kquant_quantize_activations", [](const Tensor& x, int64_t isa) {
    return qdot::kquant_quantize_activations(x, qdot::checked_isa(isa));
  }, py::arg("x"), py::arg("isa") = int64_t{-1});
  m.def("qdot_packed_shape", &qdot::packed_shape);
  m.attr("QDOT_DENSE_ROWS") = qdot::kDenseRows;
  // The native decode step's elementwise loops on their own, for the tests: float32 rows in, float32 rows out,
  // `bf16` rounding as a bfloat16 model's; `native_portable(True)` makes every loop take its portable form.
  m.def("native_portable", [](bool portable) { native_decode::portable_loops() = portable; });
  m.def("native_round", [](const Tensor& x) {
    Tensor y = x.to(at::kFloat).contiguous().clone();
    Rounding{true}.row(y.data_ptr<float>(), y.numel());
    return y;
  });
  m.def("native_store_bf16", [](const Tensor& x) {
    Tensor src = x.to(at::kFloat).contiguous();
    Tensor y = at::empty(src.sizes(), src.options().dtype(at::kBFloat16));
    native_decode::store(y.data_ptr<c10::BFloat16>(), src.data_ptr<float>(), src.numel());
    return y;
  });
  m.def("native_widen", [](const Tensor& x) {
    Tensor src = x.to(at::kBFloat16).contiguous();
    Tensor y = at::empty(src.sizes(), src.options().dtype(at::kFloat));
    native_decode::widen(y.data_ptr<float>(), src.data_ptr<c10::BFloat16>(), src.numel());
    return y;
  });
  m.def("native_rms_norm", [](const Tensor& x, const Tensor& weight, double eps, bool bf16) {
    Tensor y = x.to(at::kFloat).contiguous().clone();
    Tensor w = weight.to(at::kFloat).contiguous();
    native_decode::rms_norm(y.data_ptr<float>(), y.data_ptr<float>(), y.size(0), y.size(1), y.size(1),
                            w.data_ptr<float>(), static_cast<float>(eps), Rounding{bf16});
    return y;
  });
  m.def("native_rotate_half", [](const Tensor& x, const Tensor& cos, const Tensor& sin, bool bf16) {
    Tensor y = x.to(at::kFloat).contiguous().clone();  // [heads, head_dim]
    Tensor c = cos.contiguous(), s = sin.contiguous();
    const bool tables_bf16 = c.scalar_type() == at::kBFloat16;
    native_decode::rotate_half(y.data_ptr<float>(), y.size(0), y.size(1), {c.data_ptr(), tables_bf16},
                               {s.data_ptr(), tables_bf16}, c.numel(), Rounding{bf16});
    return y;
  });
  m.def("native_add_rounded", [](const Tensor& y, const Tensor& x, bool bf16) {
    return two_operand_loop(native_decode::add_rounded, y, x, bf16);
  });
  m.def("native_scale", [](const Tensor& x, double a, bool divide) {
    Tensor out = x.to(at::kFloat).contiguous().clone();
    (divide ? native_decode::divide_row : native_decode::scale_row)(out.data_ptr<float>(), static_cast<float>(a),
                                                                     out.numel());
    return out;
  });
  m.def("native_gate_product", [](const Tensor& gate, const Tensor& up, bool bf16) {
    return two_operand_loop(native_decode::gate_product, gate, up, bf16);
  });
  py::class_<DecoderLayerPlan>(m, "DecoderLayerPlan")
      .def(py::init([](NormPlan input_norm, NormPlan post_attention_norm, LinearPlan qkv, LinearPlan o,
                       LinearPlan gate_up, LinearPlan down, int64_t num_heads, int64_t num_kv_heads,
                       int64_t head_dim, double scale, std::optional<NormPlan> pre_feedforward_norm,
                       std::optional<NormPlan> post_feedforward_norm, std::optional<NormPlan> q_norm,
                       std::optional<NormPlan> k_norm, bool concat_qk, int64_t activation,
                       std::optional<double> softcap, int64_t sliding_window) {
             TORCH_CHECK(pre_feedforward_norm.has_value() == post_feedforward_norm.has_value(),
                         "sandwich norms come in pairs");
             TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q/k norms come in pairs");
             TORCH_CHECK(!q_norm || concat_qk, "q/k norms need concat_qk");
             TORCH_CHECK(activation == kSilu || activation == kGeluTanh, "unknown activation ", activation);
             TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0: none), got ", sliding_window);
             LayerOptions options{pre_feedforward_norm, post_feedforward_norm, q_norm, k_norm, concat_qk,
                                  activation, softcap, sliding_window};
             return DecoderLayerPlan{input_norm, post_attention_norm, qkv, o, gate_up, down,
                                     num_heads, num_kv_heads, head_dim, scale, options};
           }),
           py::arg("input_norm"), py::arg("post_attention_norm"), py::arg("qkv"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("num_heads"), py::arg("num_kv_heads"),
           py::arg("head_dim"), py::arg("scale"), py::arg("pre_feedforward_norm") = py::none(),
           py::arg("post_feedforward_norm") = py::none(), py::arg("q_norm") = py::none(),
           py::arg("k_norm") = py::none(), py::arg("concat_qk") = false, py::arg("activation") = int64_t{kSilu},
           py::arg("softcap") = py::none(), py::arg("sliding_window") = int64_t{0})
      .def("forward", &DecoderLayerPlan::forward, py::call_guard<py::gil_scoped_release>())
      .def_readonly("native_steps", &DecoderLayerPlan::native_steps);
}
