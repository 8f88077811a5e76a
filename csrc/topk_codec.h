// The entropy coder of the store's `sqrt_ac` codec (kdengine/store/FORMAT.md, "sqrt_ac"): quantized
// top-k rows <-> one rANS-coded body, with context models that adapt within the frame. Plain C++,
// independent of torch and of the loss kernels; bindings.cpp wraps it for Python. Quantization
// (log-probabilities -> sqrt levels and back) stays in kdengine/store/codec.py.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace kdengine {

// A body that does not decode: corrupt, truncated, or coded with other tables or tokens. Bad
// arguments to encode raise std::invalid_argument instead.
class TopKCodecError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One frame's rows (one sample). encode reads ids, levels and tail (each row's entries in any order);
// decode writes them, each row by level descending, then id ascending. A ragged coder's rows hold
// counts[r] entries (1..k): the first counts[r] columns, the rest ignored by encode and written as
// id -1, level 0 by decode.
struct TopKRows {
  int64_t rows = 0;
  int32_t* ids = nullptr;                 // [rows, k] distinct ids in [0, vocab)
  int32_t* levels = nullptr;              // [rows, k] in [1, max_level]
  int32_t* counts = nullptr;              // [rows] entries per row (ragged coders only)
  int32_t* tail = nullptr;                // [rows] the tail level, in [1, max_level]
  const int32_t* context = nullptr;       // [rows] the input token at the row's position t: input_ids[t]
  const int32_t* prev_context = nullptr;  // [rows] input_ids[t - 1], or -1 when t == 0
  const int32_t* next = nullptr;          // [rows] input_ids[t + 1], the token the row predicts
};

class TopKCoder {
 public:
  // prior: [vocab] per-id weights in [1, 2^23] summing to at most 2^24 (kdengine/store/codec.py
  // derives them from the shard's learned id counts).
  // ragged: each row has its own entry count (adaptive K), coded in the body.
  TopKCoder(int k, int vocab, int max_level, std::vector<uint32_t> prior, bool ragged = false);

  // Throws std::invalid_argument for rows that break the contract above (the message names the row).
  // id_bits, if not null, receives the information content (bits) of the ids: the share of the body
  // that codes ids rather than levels (for `kdengine inspect`'s split; costs a log2 per symbol).
  std::vector<uint8_t> encode(const TopKRows& rows, double* id_bits = nullptr) const;
  // Throws TopKCodecError for a body that does not decode into rows.rows rows.
  void decode(const uint8_t* data, size_t size, TopKRows& rows) const;

  int k() const { return k_; }
  int vocab() const { return vocab_; }
  int max_level() const { return max_level_; }
  bool ragged() const { return ragged_; }
  const std::vector<uint32_t>& prior_tree() const { return prior_tree_; }

 private:
  int k_, vocab_, max_level_;
  bool ragged_;
  std::vector<uint32_t> prior_;
  std::vector<uint32_t> prior_tree_;  // prior_ as a sum tree, copied at the start of each frame
};

}  // namespace kdengine
