// The `sqrt` codec's streams -> ids, levels, tail levels; the spec is kdengine/store/FORMAT.md ("sqrt")
// and the reference SqrtCodec.decode in kdengine/store/codec.py, which this follows step by step
// (the same checks in the same order, the same messages). Integers wrap as numpy's int64 do.
#include "sqrt_streams.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "topk_codec.h"

namespace kdengine {
namespace {

// ---- constants of the format (codec.py: _COLUMN_GROUPS, _NIBBLE_FROM, _ID_SUB, _HEAD_SUB) ------------
constexpr int kColumnGroups[] = {0, 1, 4, 16};
constexpr int kNibbleFrom = 16;
constexpr int kIdSub = 2, kHeadSub = 3;
constexpr int kMaxField = 57;  // a low-bit field is read through one 8-byte window

// For every byte symbol: how many low bits follow it and the value's leading bits (codec.py's
// _symbol_tables).
struct SymbolTable {
  uint8_t nbits[256];
  uint8_t top[256];
  constexpr explicit SymbolTable(int sub) : nbits(), top() {
    for (int s = 0; s < 256; ++s) {
      const bool small = s < (2 << sub);
      nbits[s] = static_cast<uint8_t>(small ? 0 : (s >> sub) - 1);
      top[s] = static_cast<uint8_t>(small ? s : (s & ((1 << sub) - 1)) | (1 << sub));
    }
  }
};
constexpr SymbolTable kIdTable(kIdSub), kHeadTable(kHeadSub);

int64_t unbucket(const SymbolTable& t, uint8_t symbol, uint64_t low) {
  return static_cast<int64_t>((uint64_t{t.top[symbol]} << t.nbits[symbol]) | low) - 1;
}

// The low bits: one big-endian bit string, fields read in order.
class BitReader {
 public:
  BitReader(const uint8_t* bits, size_t size) : padded_(bits, bits + size) { padded_.resize(size + 8, 0); }
  uint64_t read(int n) {  // n <= kMaxField
    uint64_t word;
    std::memcpy(&word, padded_.data() + (at_ >> 3), 8);
    word = __builtin_bswap64(word) << (at_ & 7);  // the bit string is big-endian; the field on top
    at_ += static_cast<size_t>(n);
    return (word >> 1) >> (63 - n);  // two shifts: n = 0 gives 0 without a branch
  }

 private:
  std::vector<uint8_t> padded_;
  size_t at_ = 0;
};

struct Group {
  int lo, hi, width;  // columns [lo, hi); width = step columns max(lo, 1)..hi-1
  bool nibbles;
  const uint8_t* steps = nullptr;
  const uint8_t* ties = nullptr;   // id symbols of the tie-run starts
  const uint8_t* others = nullptr;  // id symbols of the other columns
  int cap() const { return nibbles ? 15 : 255; }
  int step_at(int64_t row, int c) const {  // the stored step c of a row (before its escape)
    if (!nibbles) return steps[row * width + c];
    const uint8_t byte = steps[row * ((width + 1) / 2) + c / 2];
    return c % 2 ? byte & 15 : byte >> 4;
  }
};

std::string str(uint64_t v) { return std::to_string(v); }

}  // namespace

void sqrt_decode_streams(const uint8_t* streams, size_t streams_size, const uint8_t* bits, size_t bits_size,
                         const SqrtFrameShape& shape, const int32_t* vocab_order, int64_t vocab, int32_t* ids,
                         int32_t* levels, int32_t* tail) {
  const int64_t rows = shape.rows;
  const int k = shape.k;
  size_t at = 0;
  auto take = [&](uint64_t n) {
    if (at + n > streams_size) throw TopKCodecError("stream ends at byte " + str(streams_size) + ", needed " + str(at + n));
    const uint8_t* p = streams + at;
    at += n;
    return p;
  };

  // Pass 1: where each stream lies, and how many low bits each field has.
  uint64_t total_bits = 0;
  int widest = 0;
  auto count_fields = [&](const uint8_t* symbols, uint64_t n, const SymbolTable& t) {
    for (uint64_t i = 0; i < n; ++i) {
      total_bits += t.nbits[symbols[i]];
      widest = std::max<int>(widest, t.nbits[symbols[i]]);
    }
  };
  const uint8_t* heads = take(2 * static_cast<uint64_t>(rows));
  count_fields(heads, 2 * rows, kHeadTable);
  std::vector<Group> groups;
  for (size_t g = 0; g < std::size(kColumnGroups); ++g) {
    const int lo = kColumnGroups[g];
    const int hi = std::min(g + 1 < std::size(kColumnGroups) ? kColumnGroups[g + 1] : k, k);
    if (lo >= k) continue;
    Group group{lo, hi, hi - std::max(lo, 1), lo >= kNibbleFrom};
    uint64_t tie_count = static_cast<uint64_t>(rows) * (hi - lo);
    if (group.width > 0) {
      group.steps = take(static_cast<uint64_t>(rows) * (group.nibbles ? (group.width + 1) / 2 : group.width));
      uint64_t escaped = 0, zeros = 0;
      for (int64_t r = 0; r < rows; ++r) {
        for (int c = 0; c < group.width; ++c) {
          const int s = group.step_at(r, c);
          escaped += s == group.cap();
          zeros += s == 0;
        }
      }
      total_bits += escaped * shape.escape_bits;
      if (escaped) widest = std::max(widest, shape.escape_bits);
      if (lo > 0) tie_count -= zeros;  // a column starts a tie run where its step is > 0
    }
    group.ties = take(tie_count);
    count_fields(group.ties, tie_count, kIdTable);
    const uint64_t other_count = static_cast<uint64_t>(rows) * (hi - lo) - tie_count;
    group.others = take(other_count);
    count_fields(group.others, other_count, kIdTable);
    groups.push_back(group);
  }
  if (at != streams_size) throw TopKCodecError(str(streams_size - at) + " bytes left over after the last stream");
  if (bits_size != (total_bits + 7) / 8) {
    throw TopKCodecError("expected " + str((total_bits + 7) / 8) + " bytes of low bits, got " + str(bits_size));
  }
  if (widest > kMaxField) throw TopKCodecError("a low-bit field is wider than 57 bits");

  // Pass 2: the values, in the order of their low bits.
  BitReader low(bits, bits_size);
  std::vector<int64_t> head(2 * rows);
  for (int64_t i = 0; i < 2 * rows; ++i) head[i] = unbucket(kHeadTable, heads[i], low.read(kHeadTable.nbits[heads[i]]));
  // Every entry of these is written below before it is read.
  const size_t entries = static_cast<size_t>(rows) * k;
  std::unique_ptr<int64_t[]> step(new int64_t[entries]), value(new int64_t[entries]);
  // Column j starts a tie run: j == 0 or its step > 0 (int32, not a char type, which would alias everything).
  std::unique_ptr<int32_t[]> tie(new int32_t[entries]);
  std::vector<int> columns(k);
  for (const Group& group : groups) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int j = group.lo; j < group.hi; ++j) {
        int64_t s = j == 0 ? 0 : group.step_at(r, j - std::max(group.lo, 1));
        if (j > 0 && s == group.cap()) s += static_cast<int64_t>(low.read(shape.escape_bits));
        step[r * k + j] = s;  // step[r, j] = level[j - 1] - level[j]; step[r, 0] unused
        tie[r * k + j] = j == 0 || s > 0;
      }
    }
    for (const bool ties : {true, false}) {
      const uint8_t* symbols = ties ? group.ties : group.others;
      for (int64_t r = 0; r < rows; ++r) {
        // This row's columns of the kind wanted, gathered without a branch per column (tie starts
        // follow the data, so a branch on them mispredicts about half the time).
        int n = 0;
        for (int j = group.lo; j < group.hi; ++j) {
          columns[n] = j;
          n += tie[r * k + j] == ties;
        }
        for (int i = 0; i < n; ++i) {
          const uint8_t s = *symbols++;
          value[r * k + columns[i]] = unbucket(kIdTable, s, low.read(kIdTable.nbits[s]));
        }
      }
    }
  }

  bool levels_in_range = true;
  std::vector<int64_t> level(k);
  for (int64_t r = 0; r < rows; ++r) {
    level[k - 1] = head[2 * r] + 1;
    for (int j = k - 2; j >= 0; --j) {
      level[j] = static_cast<int64_t>(static_cast<uint64_t>(level[j + 1]) + static_cast<uint64_t>(step[r * k + j + 1]));
    }
    uint64_t squares = 0;
    for (int j = 0; j < k; ++j) squares += static_cast<uint64_t>(level[j]) * static_cast<uint64_t>(level[j]);
    const int64_t room = static_cast<int64_t>(static_cast<uint64_t>(shape.max_level * shape.max_level) - squares);
    const int64_t predicted = static_cast<int64_t>(std::nearbyint(std::sqrt(static_cast<double>(std::max<int64_t>(room, 0)))));
    const int64_t z = head[2 * r + 1];
    const int64_t residual = (z & 1) ? -((z + 1) / 2) : z / 2;
    const int64_t t = predicted + residual;
    levels_in_range &= level[0] <= shape.max_level && level[k - 1] >= 1 && t >= 1 && t <= shape.max_level;
    if (!levels_in_range) break;
    for (int j = 0; j < k; ++j) levels[r * k + j] = static_cast<int32_t>(level[j]);
    tail[r] = static_cast<int32_t>(t);
  }
  if (!levels_in_range) throw TopKCodecError("decoded levels fall outside [1, ceil(1/delta)]");

  bool too_big = false, negative = false;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t rank = 0;
    for (int j = 0; j < k; ++j) {
      const int64_t v = value[r * k + j];
      rank = v + (tie[r * k + j] ? 0 : rank + 1);
      if (rank >= vocab) {
        too_big = true;
        rank = vocab;  // saturate: the frame is refused either way
      }
      negative |= rank < 0;
      ids[r * k + j] = rank >= 0 && rank < vocab ? vocab_order[rank] : -1;
    }
  }
  if (too_big) throw TopKCodecError("a decoded rank is >= the vocabulary size " + std::to_string(vocab));
  if (negative) throw TopKCodecError("a decoded rank is negative");
}

}  // namespace kdengine
