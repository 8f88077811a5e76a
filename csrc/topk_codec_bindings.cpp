// The store's top-k coders for Python (numpy in, numpy/bytes out): sqrt_ac's TopKCoder and the
// integer half of the `sqrt` codec. Shapes are checked here; the
// user-facing validation (ValueError naming the row) lives in kdengine/store/codec.py.
#include "topk_codec_bindings.h"

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "sqrt_streams.h"
#include "topk_codec.h"

namespace kdengine {
namespace {

namespace py = pybind11;
using Int32Array = py::array_t<int32_t, py::array::c_style>;  // no forcecast: int32 exactly

void check_array(const Int32Array& a, const char* name, std::vector<int64_t> shape) {
  std::vector<int64_t> got(a.shape(), a.shape() + a.ndim());
  if (got != shape) {
    auto show = [](const std::vector<int64_t>& v) {
      std::string s = "[";
      for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
      return s + "]";
    };
    throw py::value_error(std::string(name) + " must have shape " + show(shape) + ", got " + show(got));
  }
}

TopKRows rows_of(const Int32Array& context, const Int32Array& prev, const Int32Array& next) {
  const int64_t p = context.ndim() == 1 ? context.shape(0) : -1;
  check_array(context, "context", {p});
  check_array(prev, "prev_context", {p});
  check_array(next, "next", {p});
  TopKRows r;
  r.rows = p;
  r.context = context.data();
  r.prev_context = prev.data();
  r.next = next.data();
  return r;
}

py::object coder_encode(const TopKCoder& coder, const Int32Array& ids, const Int32Array& levels, const Int32Array& tail,
                        const Int32Array& context, const Int32Array& prev, const Int32Array& next,
                        const std::optional<Int32Array>& counts, bool with_id_bits) {
  TopKRows r = rows_of(context, prev, next);
  check_array(ids, "ids", {r.rows, coder.k()});
  check_array(levels, "levels", {r.rows, coder.k()});
  check_array(tail, "tail", {r.rows});
  if (coder.ragged() != counts.has_value()) {
    throw py::value_error(coder.ragged() ? "TopKCoder.encode: a ragged coder needs counts"
                                         : "TopKCoder.encode: counts are for ragged coders only");
  }
  if (counts) {
    check_array(*counts, "counts", {r.rows});
    r.counts = const_cast<int32_t*>(counts->data());
  }
  r.ids = const_cast<int32_t*>(ids.data());
  r.levels = const_cast<int32_t*>(levels.data());
  r.tail = const_cast<int32_t*>(tail.data());
  std::vector<uint8_t> body;
  double id_bits = 0.0;
  {
    py::gil_scoped_release release;
    body = coder.encode(r, with_id_bits ? &id_bits : nullptr);
  }
  py::bytes out(reinterpret_cast<const char*>(body.data()), body.size());
  if (with_id_bits) return py::make_tuple(out, id_bits);
  return out;
}

py::tuple coder_decode(const TopKCoder& coder, const py::buffer& body, const Int32Array& context,
                       const Int32Array& prev, const Int32Array& next) {
  const py::buffer_info info = body.request();
  if (info.ndim != 1 || info.itemsize != 1 || (info.shape[0] > 1 && info.strides[0] != 1)) {
    throw py::value_error("TopKCoder.decode: body must be contiguous bytes");
  }
  TopKRows r = rows_of(context, prev, next);
  Int32Array ids({r.rows, static_cast<int64_t>(coder.k())});
  Int32Array levels({r.rows, static_cast<int64_t>(coder.k())});
  Int32Array tail({r.rows});
  Int32Array counts({coder.ragged() ? r.rows : 0});
  r.ids = ids.mutable_data();
  r.levels = levels.mutable_data();
  r.tail = tail.mutable_data();
  if (coder.ragged()) r.counts = counts.mutable_data();
  {
    py::gil_scoped_release release;
    coder.decode(static_cast<const uint8_t*>(info.ptr), static_cast<size_t>(info.shape[0]), r);
  }
  if (coder.ragged()) return py::make_tuple(ids, levels, tail, counts);
  return py::make_tuple(ids, levels, tail, py::none());
}

// Many frames in one call (one sample each, as the store concatenates them): frame j is
// payload[frame_offsets[j], frame_offsets[j+1]) with its 12-byte header (FORMAT.md, "Codec frames"),
// and its rows are [row_offsets[j], row_offsets[j+1]) of the concatenated context arrays and outputs.
py::tuple coder_decode_frames(const TopKCoder& coder, const py::buffer& payload, const py::bytes& tag,
                              const py::array_t<int64_t, py::array::c_style>& frame_offsets,
                              const py::array_t<int64_t, py::array::c_style>& row_offsets, const Int32Array& context,
                              const Int32Array& prev, const Int32Array& next) {
  const py::buffer_info info = payload.request();
  if (info.ndim != 1 || info.itemsize != 1 || (info.shape[0] > 1 && info.strides[0] != 1)) {
    throw py::value_error("TopKCoder.decode_frames: payload must be contiguous bytes");
  }
  const std::string tag_bytes = tag;
  const int64_t n = frame_offsets.ndim() == 1 ? frame_offsets.shape(0) - 1 : -1;
  if (n < 0 || tag_bytes.size() != 2 || row_offsets.ndim() != 1 || row_offsets.shape(0) != n + 1) {
    throw py::value_error("TopKCoder.decode_frames: expected a 2-byte tag and frame/row offsets of the same length");
  }
  TopKRows all = rows_of(context, prev, next);
  const int64_t* fo = frame_offsets.data();
  const int64_t* ro = row_offsets.data();
  if (ro[0] != 0 || ro[n] != all.rows || fo[0] < 0 || fo[n] > info.shape[0]) {
    throw py::value_error("TopKCoder.decode_frames: offsets do not fit the payload and the rows");
  }
  const int64_t k = coder.k();
  Int32Array ids({all.rows, k});
  Int32Array levels({all.rows, k});
  Int32Array tail({all.rows});
  Int32Array counts({coder.ragged() ? all.rows : 0});
  const uint8_t* data = static_cast<const uint8_t*>(info.ptr);
  int32_t* ids_out = ids.mutable_data();
  int32_t* levels_out = levels.mutable_data();
  int32_t* tail_out = tail.mutable_data();
  int32_t* counts_out = coder.ragged() ? counts.mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    for (int64_t j = 0; j < n; ++j) {
      auto fail = [j](const std::string& what) { throw TopKCodecError("frame " + std::to_string(j) + ": " + what); };
      const int64_t size = fo[j + 1] - fo[j], rows = ro[j + 1] - ro[j];
      if (size < 12 || rows < 0) fail("shorter than its 12-byte header");
      const uint8_t* f = data + fo[j];
      const uint32_t frame_k = f[2] | (f[3] << 8);
      const uint32_t frame_rows = f[4] | (f[5] << 8) | (f[6] << 16) | (static_cast<uint32_t>(f[7]) << 24);
      const uint32_t body = f[8] | (f[9] << 8) | (f[10] << 16) | (static_cast<uint32_t>(f[11]) << 24);
      if (f[0] != static_cast<uint8_t>(tag_bytes[0]) || f[1] != static_cast<uint8_t>(tag_bytes[1])) {
        fail("frame tag is not the codec's " + tag_bytes);
      }
      if (frame_k != static_cast<uint32_t>(k)) fail("frame holds K=" + std::to_string(frame_k) + ", the store says K=" + std::to_string(k));
      if (frame_rows != static_cast<uint64_t>(rows)) {
        fail("frame holds " + std::to_string(frame_rows) + " positions, the sample has " + std::to_string(rows));
      }
      if (12 + static_cast<int64_t>(body) != size) fail("frame length does not match its header");
      TopKRows r = all;
      r.rows = rows;
      r.context += ro[j];
      r.prev_context += ro[j];
      r.next += ro[j];
      r.ids = ids_out + ro[j] * k;
      r.levels = levels_out + ro[j] * k;
      r.tail = tail_out + ro[j];
      r.counts = counts_out ? counts_out + ro[j] : nullptr;
      try {
        coder.decode(f + 12, body, r);
      } catch (const TopKCodecError& e) {
        fail(e.what());
      }
    }
  }
  if (coder.ragged()) return py::make_tuple(ids, levels, tail, counts);
  return py::make_tuple(ids, levels, tail, py::none());
}

// The sqrt levels' log-probabilities (FORMAT.md, "sqrt_ac"): entry (r, j) is
// log_level[levels[r, j]] - log(sum_j levels[r, j]^2 + tail[r]^2), rounded to float32; level 0 (a ragged
// row's padding) has log_level[0] = -inf and adds nothing to the sum. The table comes from
// kdengine/store/codec.py, which owns the quantization; this is the per-entry loop, without numpy's
// temporaries.
py::array_t<float> dequantize_levels(const Int32Array& levels, const Int32Array& tail,
                                     const py::array_t<double, py::array::c_style>& log_level) {
  if (levels.ndim() != 2) throw py::value_error("dequantize_levels: levels must be [P, K]");
  const int64_t p = levels.shape(0), k = levels.shape(1);
  check_array(tail, "tail", {p});
  if (log_level.ndim() != 1) throw py::value_error("dequantize_levels: log_level must be one-dimensional");
  const int64_t table_size = log_level.shape(0);
  py::array_t<float> out({p, k});
  const int32_t* lv = levels.data();
  const int32_t* tl = tail.data();
  const double* table = log_level.data();
  float* logp = out.mutable_data();
  bool in_range = true;
  {
    py::gil_scoped_release release;
    for (int64_t r = 0; r < p && in_range; ++r) {
      const int32_t* row = lv + r * k;
      int64_t squares = static_cast<int64_t>(tl[r]) * tl[r];
      for (int64_t j = 0; j < k; ++j) {
        in_range &= row[j] >= 0 && row[j] < table_size;
        squares += static_cast<int64_t>(row[j]) * row[j];
      }
      in_range &= tl[r] >= 1 && tl[r] < table_size;
      if (!in_range) break;
      const double log_z = std::log(static_cast<double>(squares));
      for (int64_t j = 0; j < k; ++j) logp[r * k + j] = static_cast<float>(table[row[j]] - log_z);
    }
  }
  if (!in_range) throw py::value_error("dequantize_levels: a level lies outside the table");
  return out;
}

const uint8_t* contiguous_bytes(const py::buffer_info& info, const char* what) {
  if (info.ndim != 1 || info.itemsize != 1 || (info.shape[0] > 1 && info.strides[0] != 1)) {
    throw py::value_error(std::string("sqrt_decode_streams: ") + what + " must be contiguous bytes");
  }
  return static_cast<const uint8_t*>(info.ptr);
}

py::tuple sqrt_decode(const py::buffer& streams, const py::buffer& bits, int64_t rows, int k, int escape_bits,
                      int64_t max_level, const Int32Array& vocab_order) {
  const py::buffer_info s = streams.request(), b = bits.request();
  if (rows < 0 || k < 1 || escape_bits < 1 || escape_bits > 32 || max_level < 1 || max_level >= (1 << 20) ||
      vocab_order.ndim() != 1) {
    throw py::value_error("sqrt_decode_streams: expected rows >= 0, k >= 1, escape_bits in [1, 32], "
                          "max_level in [1, 2^20) and a one-dimensional vocab_order");
  }
  const uint8_t* stream_data = contiguous_bytes(s, "streams");
  const uint8_t* bit_data = contiguous_bytes(b, "bits");
  if (static_cast<uint64_t>(rows) * 2 > static_cast<uint64_t>(s.shape[0])) {  // before allocating for `rows`
    throw TopKCodecError("stream ends at byte " + std::to_string(s.shape[0]) + ", needed " + std::to_string(2 * rows));
  }
  const SqrtFrameShape shape{rows, k, escape_bits, max_level};
  Int32Array ids({rows, static_cast<int64_t>(k)}), levels({rows, static_cast<int64_t>(k)}), tail({rows});
  {
    py::gil_scoped_release release;
    sqrt_decode_streams(stream_data, static_cast<size_t>(s.shape[0]), bit_data, static_cast<size_t>(b.shape[0]),
                        shape, vocab_order.data(), vocab_order.shape(0), ids.mutable_data(), levels.mutable_data(),
                        tail.mutable_data());
  }
  return py::make_tuple(ids, levels, tail);
}

py::tuple sqrt_encode(const Int32Array& levels, const Int32Array& ranks, const Int32Array& tail, int escape_bits,
                      int64_t max_level) {
  if (levels.ndim() != 2 || levels.shape(1) < 1 || escape_bits < 1 || escape_bits > 32 || max_level < 1 ||
      max_level >= (1 << 20)) {
    throw py::value_error("sqrt_encode_streams: expected levels [P, K >= 1], escape_bits in [1, 32] and max_level "
                          "in [1, 2^20)");
  }
  const int64_t rows = levels.shape(0), k = levels.shape(1);
  check_array(ranks, "ranks", {rows, k});
  check_array(tail, "tail", {rows});
  const SqrtFrameShape shape{rows, static_cast<int>(k), escape_bits, max_level};
  SqrtStreams out;
  {
    py::gil_scoped_release release;
    out = sqrt_encode_streams(levels.data(), ranks.data(), tail.data(), shape);
  }
  py::list streams;
  for (const auto& stream : out.streams) streams.append(py::bytes(reinterpret_cast<const char*>(stream.data()), stream.size()));
  return py::make_tuple(streams, py::bytes(reinterpret_cast<const char*>(out.bits.data()), out.bits.size()));
}

}  // namespace

void bind_topk_codec(py::module_& m) {
  py::register_exception<TopKCodecError>(m, "TopKCodecError", PyExc_ValueError);
  py::class_<TopKCoder>(m, "TopKCoder", "the sqrt_ac codec's coder (csrc/topk_codec.h)")
      .def(py::init([](int k, int vocab, int max_level, const py::array_t<uint32_t, py::array::c_style>& prior,
                       bool ragged) {
             std::vector<uint32_t> weights(prior.data(), prior.data() + prior.size());
             return new TopKCoder(k, vocab, max_level, std::move(weights), ragged);
           }),
           py::arg("k"), py::arg("vocab"), py::arg("max_level"), py::arg("prior"), py::arg("ragged") = false)
      .def_property_readonly("ragged", &TopKCoder::ragged)
      .def("encode", &coder_encode, py::arg("ids"), py::arg("levels"), py::arg("tail"), py::arg("context"),
           py::arg("prev_context"), py::arg("next"), py::arg("counts") = py::none(), py::arg("with_id_bits") = false,
           "int32 ids/levels [P, K] (any order in a row; ragged: the first counts[r] columns), tail/context/"
           "prev_context/next [P] -> body bytes, or (body, id bits) with with_id_bits")
      .def("decode", &coder_decode, py::arg("body"), py::arg("context"), py::arg("prev_context"), py::arg("next"),
           "body + int32 [P] tokens -> (ids [P, K], levels [P, K], tail [P], counts [P] or None); ragged rows are "
           "padded with id -1, level 0; raises TopKCodecError")
      .def("decode_frames", &coder_decode_frames, py::arg("payload"), py::arg("tag"), py::arg("frame_offsets"),
           py::arg("row_offsets"), py::arg("context"), py::arg("prev_context"), py::arg("next"),
           "many whole frames (header included) + their concatenated int32 tokens -> the decode outputs, "
           "concatenated; raises TopKCodecError naming the frame")
      .def_static("dequantize_levels", &dequantize_levels, py::arg("levels"), py::arg("tail"), py::arg("log_level"),
                  "int32 levels [P, K] and tail [P], float64 log_level table -> float32 log-probs [P, K]: "
                  "log_level[level] - log(sum of squared levels + tail^2) per row");
  m.def("sqrt_decode_streams", &sqrt_decode, py::arg("streams"), py::arg("bits"), py::arg("rows"), py::arg("k"),
        py::arg("escape_bits"), py::arg("max_level"), py::arg("vocab_order"),
        "the `sqrt` codec's decompressed streams + low bits -> (ids int32 [P, K], levels int32 [P, K], tail int32 "
        "[P]), as SqrtCodec's numpy decoder gives them; raises TopKCodecError");
  m.def("sqrt_encode_streams", &sqrt_encode, py::arg("levels"), py::arg("ranks"), py::arg("tail"),
        py::arg("escape_bits"), py::arg("max_level"),
        "int32 levels and id ranks [P, K] (any order in a row), tail levels [P] -> (the `sqrt` codec's symbol "
        "streams, each its own zstd block, as a list of bytes; the low bits), as SqrtCodec's numpy encoder "
        "makes them");
}

}  // namespace kdengine
