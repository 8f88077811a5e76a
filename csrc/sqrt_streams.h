// The integer half of the store's `sqrt` codec decode (kdengine/store/FORMAT.md, "sqrt"): the
// decompressed symbol streams and the low bits -> ids, levels and tail levels. Plain C++, independent
// of torch; zstd, the frame header and the log-probabilities stay in kdengine/store/codec.py, whose
// numpy decoder is the reference this must match exactly (and the fallback without the extension).
#pragma once

#include <cstddef>
#include <cstdint>

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
void sqrt_decode_streams(const uint8_t* streams, size_t streams_size, const uint8_t* bits, size_t bits_size,
                         const SqrtFrameShape& shape, const int32_t* vocab_order, int64_t vocab, int32_t* ids,
                         int32_t* levels, int32_t* tail);

}  // namespace kdengine
