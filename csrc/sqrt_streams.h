// The integer half of the store's `sqrt` codec (kdengine/store/FORMAT.md, "sqrt"): quantized rows <->
// the symbol streams and the low bits that zstd and the frame then wrap. Plain C++, independent of
// torch; quantization, zstd, the frame header and the log-probabilities stay in
// kdengine/store/codec.py, whose numpy encoder and decoder are the reference these must match byte
// for byte and value for value (and the fallback without the extension).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kdengine {

struct SqrtFrameShape {
  int64_t rows = 0;        // P, positions in the frame
  int k = 0;               // entries per row
  int escape_bits = 0;     // bit_length(Lmax): the width of an escaped step's low bits
  int64_t max_level = 0;   // Lmax = ceil(1 / delta)
};

// Decodes one frame's streams (`streams`: the zstd body decompressed; `bits`: the low bits after the
// body) into ids [rows, k] (vocab_order[rank], by level descending, then rank), levels [rows, k] and
// tail levels [rows]. Throws TopKCodecError (topk_codec.h), with the reference's messages, for streams
// that do not decode.
// One frame's symbol streams, in the order zstd gets them (each its own block), and its low bits.
struct SqrtStreams {
  std::vector<std::vector<uint8_t>> streams;
  std::vector<uint8_t> bits;
};

// Encodes rows of levels [rows, k] (each in [1, max_level]), the ranks of their ids in the shard's
// vocab_order [rows, k] (in [0, 2^31)) and tail levels [rows]; a row's entries may come in any order.
SqrtStreams sqrt_encode_streams(const int32_t* levels, const int32_t* ranks, const int32_t* tail,
                                const SqrtFrameShape& shape);

void sqrt_decode_streams(const uint8_t* streams, size_t streams_size, const uint8_t* bits, size_t bits_size,
                         const SqrtFrameShape& shape, const int32_t* vocab_order, int64_t vocab, int32_t* ids,
                         int32_t* levels, int32_t* tail);

}  // namespace kdengine
