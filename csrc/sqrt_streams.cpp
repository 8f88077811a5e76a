// The `sqrt` codec's rows <-> streams; the spec is kdengine/store/FORMAT.md ("sqrt") and the reference
// is SqrtCodec in kdengine/store/codec.py, which the decoder follows step by step (the same checks in
// the same order, the same messages; integers wrap as numpy's int64 do).
#include "sqrt_streams.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
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

// The column groups [lo, hi) of a row of k entries: [0,1), [1,4), [4,16), [16,k), clipped, empty dropped.
std::vector<std::pair<int, int>> column_groups(int k) {
  std::vector<std::pair<int, int>> groups;
  for (size_t g = 0; g < std::size(kColumnGroups); ++g) {
    const int lo = kColumnGroups[g];
    const int hi = std::min(g + 1 < std::size(kColumnGroups) ? kColumnGroups[g + 1] : k, k);
    if (lo < k) groups.emplace_back(lo, hi);
  }
  return groups;
}

// A number v >= 0 as a byte symbol (its magnitude class and `sub` leading mantissa bits) and raw low
// bits (codec.py's _bucket). v = -1, which only repeated ids give, is symbol 0.
struct Bucketed {
  uint8_t symbol, nbits;
  uint64_t low;
};
Bucketed bucket(int64_t v, int sub) {
  const uint64_t a = static_cast<uint64_t>(v + 1);
  const int e = a ? 63 - __builtin_clzll(a) : 0;
  if (e <= sub) return {static_cast<uint8_t>(a), 0, 0};
  const int n = e - sub;
  const uint64_t top = a >> n;
  return {static_cast<uint8_t>(((e - sub) << sub) + top), static_cast<uint8_t>(n), a - (top << n)};
}

// The low bits as one big-endian bit string, zero-padded to a byte (numpy.packbits order).
class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>& out) : out_(out) {}
  void put(uint64_t value, int n) {  // n <= kMaxField
    acc_ = (acc_ << n) | value;
    count_ += n;
    while (count_ >= 8) {
      count_ -= 8;
      out_.push_back(static_cast<uint8_t>(acc_ >> count_));
    }
  }
  void finish() {
    if (count_) out_.push_back(static_cast<uint8_t>(acc_ << (8 - count_)));
    count_ = 0;
  }

 private:
  std::vector<uint8_t>& out_;
  uint64_t acc_ = 0;
  int count_ = 0;
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

SqrtStreams sqrt_encode_streams(const int32_t* levels, const int32_t* ranks, const int32_t* tail,
                                const SqrtFrameShape& shape) {
  const int64_t rows = shape.rows;
  const int k = shape.k;
  // Each row by level descending, then rank ascending (an insertion sort: rows come sorted by
  // probability, so only entries with equal levels move).
  std::vector<int32_t> level(static_cast<size_t>(rows) * k), rank(static_cast<size_t>(rows) * k);
  for (int64_t r = 0; r < rows; ++r) {
    int32_t* lv = level.data() + r * k;
    int32_t* rk = rank.data() + r * k;
    for (int j = 0; j < k; ++j) {
      const int32_t l = levels[r * k + j], q = ranks[r * k + j];
      if (l < 1 || l > shape.max_level) throw std::invalid_argument("row " + std::to_string(r) + ": level out of range");
      if (q < 0) throw std::invalid_argument("row " + std::to_string(r) + ": rank out of range");
      int at = j;
      for (; at > 0 && (lv[at - 1] < l || (lv[at - 1] == l && rk[at - 1] > q)); --at) {
        lv[at] = lv[at - 1];
        rk[at] = rk[at - 1];
      }
      lv[at] = l;
      rk[at] = q;
    }
    if (tail[r] < 1 || tail[r] > shape.max_level) {
      throw std::invalid_argument("row " + std::to_string(r) + ": tail level out of range");
    }
  }
  auto step = [&](int64_t r, int j) { return level[r * k + j - 1] - level[r * k + j]; };  // j >= 1
  auto starts_tie = [&](int64_t r, int j) { return j == 0 || step(r, j) > 0; };

  SqrtStreams out;
  BitWriter low(out.bits);
  std::vector<uint8_t> head(2 * static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    int64_t squares = 0;
    for (int j = 0; j < k; ++j) squares += static_cast<int64_t>(level[r * k + j]) * level[r * k + j];
    const int64_t room = shape.max_level * shape.max_level - squares;
    const int64_t predicted = static_cast<int64_t>(std::nearbyint(std::sqrt(static_cast<double>(std::max<int64_t>(room, 0)))));
    const int64_t residual = tail[r] - predicted;
    const int64_t parts[2] = {level[r * k + k - 1] - 1, residual >= 0 ? 2 * residual : -2 * residual - 1};
    for (int h = 0; h < 2; ++h) {
      const Bucketed b = bucket(parts[h], kHeadSub);
      head[2 * r + h] = b.symbol;
      low.put(b.low, b.nbits);
    }
  }
  out.streams.push_back(std::move(head));
  for (const auto& [lo, hi] : column_groups(k)) {
    const int first = std::max(lo, 1), width = hi - first;
    if (width > 0) {
      const bool nibbles = lo >= kNibbleFrom;
      const int64_t cap = nibbles ? 15 : 255;
      std::vector<uint8_t> steps;
      steps.reserve(static_cast<size_t>(rows) * width);
      for (int64_t r = 0; r < rows; ++r) {
        for (int c = 0; c < width; c += nibbles ? 2 : 1) {
          const int64_t s = std::min<int64_t>(step(r, first + c), cap);
          if (!nibbles) {
            steps.push_back(static_cast<uint8_t>(s));
          } else {
            const int64_t second = c + 1 < width ? std::min<int64_t>(step(r, first + c + 1), cap) : 0;
            steps.push_back(static_cast<uint8_t>(s * 16 + second));
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int c = 0; c < width; ++c) {
          if (step(r, first + c) >= cap) low.put(static_cast<uint64_t>(step(r, first + c) - cap), shape.escape_bits);
        }
      }
      out.streams.push_back(std::move(steps));
    }
    for (const bool ties : {true, false}) {
      std::vector<uint8_t> symbols;
      for (int64_t r = 0; r < rows; ++r) {
        for (int j = lo; j < hi; ++j) {
          if (starts_tie(r, j) != ties) continue;
          const int64_t q = rank[r * k + j];
          const Bucketed b = bucket(ties ? q : q - rank[r * k + j - 1] - 1, kIdSub);
          symbols.push_back(b.symbol);
          low.put(b.low, b.nbits);
        }
      }
      out.streams.push_back(std::move(symbols));
    }
  }
  low.finish();
  return out;
}

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
  for (const auto& [lo, hi] : column_groups(k)) {
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
