// sqrt_ac entropy coder: adaptive context models + rANS. The byte-level spec is in
// kdengine/store/FORMAT.md ("sqrt_ac"); every constant in this file is part of the format.
//
// Per row (one target position), in decoding order:
//   levels: the largest level, the steps down to each next level (context: the level above and the
//           column), the tail level as a residual from the normalization;
//   ids:    if the row's next token is known, a flag "it is in the first run of equal levels"; then
//           each run of equal levels as a set. Every id is drawn from base + bonus weights: the base
//           table (the shard's prior + a boost for each earlier occurrence in the frame) and a bonus
//           list (the ids of the rows with the same input token, with the same two input tokens, and
//           of the row before, and the next token), ids already coded in the row excluded. The coded
//           value lies in the base part or the bonus part of the range; which one is taken back
//           ("bits back", as is the order of a set), so an id costs -log2((base + bonus) / total).
#include "topk_codec.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>

namespace kdengine {
namespace {

// ---- constants of the format ----------------------------------------------------------------------
constexpr uint64_t kRansL = 1ull << 31;  // the rANS state stays in [kRansL, 2^63)
constexpr int kIdBits = 31;              // precision of id symbols (totals are < 2^31)
constexpr int kBitBits = 16;             // precision of binary decisions and of bits-back choices
constexpr uint32_t kPMin = 32;           // binary probabilities stay in [kPMin, 2^16 - kPMin] / 2^16
constexpr uint32_t kBitLimit = 60;       // binary models: rate 1/(n+2) until n = kBitLimit
constexpr int kMaxClass = 21;            // numbers < 2^21
constexpr uint32_t kBoost = 1024;        // weight added to an id for each occurrence in the frame
constexpr int kSameTokenShift = 6;       // bonus total >> 6 for each id of the last row with the same token
constexpr int kSamePairShift = 6;        // ... of the last row with the same two tokens
constexpr int kPreviousRowShift = 9;     // ... of the row before
constexpr int kNextTokenShift = 3;       // ... for the next token
constexpr uint32_t kHalveAbove = 1u << 29;  // the weights are halved when their total passes this

int bit_length(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

// ---- adaptive binary models ---------------------------------------------------------------------
// P(bit == 0) in 1/65536. The update moves it 1/(n+2) of the way to the bit seen: a count-based
// (Krichevsky-Trofimov) estimate for the first kBitLimit bits, then a fixed rate.
struct BitModel {
  uint16_t p = 32768;
  uint16_t n = 0;
};

struct Rates {
  uint32_t of[kBitLimit + 1];
  constexpr Rates() : of() {
    for (uint32_t n = 0; n <= kBitLimit; ++n) of[n] = 65536u / (n + 2u);
  }
};
constexpr Rates kRates;

void update(BitModel& m, int bit) {
  const uint32_t rate = kRates.of[m.n];
  uint32_t p = m.p;
  if (bit) {
    p -= (p * rate) >> 16;
  } else {
    p += ((65536u - p) * rate) >> 16;
  }
  m.p = static_cast<uint16_t>(std::min(std::max(p, kPMin), 65536u - kPMin));
  if (m.n < kBitLimit) ++m.n;
}

// A number v >= 0: its bit length e in unary (adaptive), then for e >= 2 the bit below the leading
// one (adaptive, per e) and the other e - 2 bits raw.
struct NumberModel {
  BitModel unary[kMaxClass];
  BitModel second[kMaxClass + 1];
};

// ---- rANS ---------------------------------------------------------------------------------------
struct Symbol {
  uint32_t start, freq, bits;  // freq == 0: set run number `start`
  bool id;                     // part of coding an id (for the cost split only)
};

// A member of a set run when the run starts: in the base table, the weight of the ids below it and
// its own; in the bonus list, the weight of the entries before it, its own (0: none) and its place.
struct SetMember {
  uint32_t base_before, base, bonus_before, bonus;
  int32_t place;
};

struct SetRun {
  size_t first, count;           // members [first, first + count) of the member list, ascending ids
  uint32_t base_total, bonus_total;  // at the run's start
};

// The probability (in 1/65536) that an id with these weights was coded in its bonus part.
uint32_t bonus_share(uint32_t base, uint32_t bonus) {
  const uint64_t q = ((uint64_t{bonus} << 16) + (uint64_t{base} + bonus) / 2) / (uint64_t{base} + bonus);
  return static_cast<uint32_t>(std::min<uint64_t>(std::max<uint64_t>(q, 1), 65535));
}

// Collects the symbols in decoding order; finish() codes them last to first (rANS is a stack).
class Encoder {
 public:
  int bit(BitModel& m, int b, bool id = false) {
    const uint32_t p0 = m.p;
    if (b) {
      put(p0, 65536u - p0, kBitBits, id);
    } else {
      put(0, p0, kBitBits, id);
    }
    update(m, b);
    return b;
  }
  uint32_t raw(uint32_t v, int n) {
    while (n > 0) {
      const int chunk = std::min(n, 16);
      n -= chunk;
      put((v >> n) & ((1u << chunk) - 1), 1, chunk);
    }
    return v;
  }
  void put(uint32_t start, uint32_t freq, uint32_t bits, bool id = false) {
    symbols_.push_back({start, freq, bits, id});
  }
  std::vector<SetMember>& members() { return members_; }
  void reset() {
    symbols_.clear();
    members_.clear();
    runs_.clear();
  }
  // The members added since `first` form one set run.
  void put_set(size_t first, uint32_t base_total, uint32_t bonus_total) {
    if (members_.size() == first) return;
    runs_.push_back({first, members_.size() - first, base_total, bonus_total});
    symbols_.push_back({static_cast<uint32_t>(runs_.size() - 1), 0, 0, true});
  }

  // id_bits: if not null, the information content of the id symbols (set runs and the next-token flags).
  std::vector<uint8_t> finish(double* id_bits = nullptr) {
    id_bits_ = id_bits;
    if (id_bits_) *id_bits_ = 0.0;
    x_ = kRansL;
    words_.clear();
    words_.reserve(symbols_.size() / 2 + 4);
    for (size_t i = symbols_.size(); i-- > 0;) {
      const Symbol& s = symbols_[i];
      if (s.freq == 0) {
        encode_set(runs_[s.start]);
      } else {
        push(s.start, s.freq, s.bits);
        if (id_bits_ && s.id) *id_bits_ += s.bits - std::log2(static_cast<double>(s.freq));
      }
    }
    std::vector<uint8_t> out(8 + 4 * words_.size());
    for (int b = 0; b < 8; ++b) out[b] = static_cast<uint8_t>(x_ >> (8 * b));
    size_t at = 8;
    for (size_t i = words_.size(); i-- > 0;) {
      for (int b = 0; b < 4; ++b) out[at++] = static_cast<uint8_t>(words_[i] >> (8 * b));
    }
    return out;
  }

 private:
  void push(uint32_t start, uint32_t freq, uint32_t bits) {
    const uint64_t x_max = ((kRansL >> bits) << 32) * freq;
    if (x_ >= x_max) {
      words_.push_back(static_cast<uint32_t>(x_));
      x_ >>= 32;
    }
    x_ = ((x_ / freq) << bits) + (x_ % freq) + start;
  }
  // Bits back: takes a choice out of the state (the decoder puts it back): the 16-bit symbol that
  // the state's low bits fall in. Words needed beyond those written so far are zeros, which the
  // decoder finds left over at the end.
  void take(uint32_t start, uint32_t freq) {
    if (id_bits_) *id_bits_ -= kBitBits - std::log2(static_cast<double>(freq));
    x_ = freq * (x_ >> 16) + (x_ & 0xffff) - start;
    if (x_ < kRansL) {
      uint32_t w = 0;
      if (!words_.empty()) {
        w = words_.back();
        words_.pop_back();
      }
      x_ = (x_ << 32) | w;
    }
  }
  uint32_t pop_uniform(uint32_t k) {  // one of k, uniformly
    const uint32_t u = static_cast<uint32_t>((((x_ & 0xffff) + 1) * k - 1) >> 16);
    const uint32_t start = static_cast<uint32_t>((uint64_t{u} << 16) / k);
    take(start, static_cast<uint32_t>(((uint64_t{u} + 1) << 16) / k) - start);
    return u;
  }
  uint32_t pop_choice(uint32_t share) {  // 1 with probability share / 65536
    const uint32_t c = (x_ & 0xffff) >= 65536u - share;
    take(c ? 65536u - share : 0, c ? share : 65536u - share);
    return c;
  }
  // A set run, as the decoder will undo it: the member the decoder decodes last is chosen first
  // (bits back), then the part of the range it is coded in (bits back), and it is coded with the
  // other members still in the tables.
  void encode_set(const SetRun& run) {
    alive_.assign(run.count, 1);
    for (size_t left = run.count; left > 0; --left) {
      uint32_t u = left > 1 ? pop_uniform(static_cast<uint32_t>(left)) : 0;
      size_t e = 0;
      while (!alive_[e] || u-- != 0) ++e;
      const SetMember& m = members_[run.first + e];
      uint64_t base_total = run.base_total, bonus_total = run.bonus_total, base_before = m.base_before,
               bonus_before = m.bonus_before;
      for (size_t i = 0; i < run.count; ++i) {
        if (!alive_[i] || i == e) continue;
        const SetMember& o = members_[run.first + i];
        base_total -= o.base;
        bonus_total -= o.bonus;
        if (i < e) base_before -= o.base;
        if (o.bonus && o.place < m.place) bonus_before -= o.bonus;
      }
      const bool in_bonus = m.bonus && pop_choice(bonus_share(m.base, m.bonus));
      const uint64_t range = base_total + bonus_total;
      const uint64_t c = in_bonus ? base_total + bonus_before : base_before;
      const uint64_t start = (c << kIdBits) / range, end = ((c + (in_bonus ? m.bonus : m.base)) << kIdBits) / range;
      push(static_cast<uint32_t>(start), static_cast<uint32_t>(end - start), kIdBits);
      if (id_bits_) *id_bits_ += kIdBits - std::log2(static_cast<double>(end - start));
      alive_[e] = 0;
    }
  }

  std::vector<Symbol> symbols_;
  std::vector<SetMember> members_;
  std::vector<SetRun> runs_;
  std::vector<uint8_t> alive_;
  std::vector<uint32_t> words_;
  uint64_t x_ = kRansL;
  double* id_bits_ = nullptr;
};

class Decoder {
 public:
  void reset(const uint8_t* data, size_t size) {
    data_ = data;
    size_ = size;
    x_ = 0;
    pushed_.clear();
    if (size < 8 || (size - 8) % 4 != 0) {
      throw TopKCodecError("body of " + std::to_string(size) + " bytes is not an 8-byte coder state plus 4-byte words");
    }
    for (int b = 0; b < 8; ++b) x_ |= static_cast<uint64_t>(data[b]) << (8 * b);
    if (x_ < kRansL || x_ >= (1ull << 63)) throw TopKCodecError("body starts with an invalid coder state");
    at_ = 8;
  }
  int bit(BitModel& m, int, bool = false) {
    const uint32_t p0 = m.p;
    const int b = (x_ & 0xffff) >= p0;
    if (b) {
      advance(p0, 65536u - p0, kBitBits);
    } else {
      advance(0, p0, kBitBits);
    }
    update(m, b);
    return b;
  }
  uint32_t raw(uint32_t, int n) {
    uint32_t v = 0;
    while (n > 0) {
      const int chunk = std::min(n, 16);
      n -= chunk;
      const uint32_t part = static_cast<uint32_t>(x_ & ((1u << chunk) - 1));
      advance(part, 1, chunk);
      v |= part << n;
    }
    return v;
  }
  uint32_t peek(int bits) const { return static_cast<uint32_t>(x_ & ((1ull << bits) - 1)); }
  void advance(uint32_t start, uint32_t freq, uint32_t bits) {
    x_ = freq * (x_ >> bits) + (x_ & ((1ull << bits) - 1)) - start;
    if (x_ < kRansL) x_ = (x_ << 32) | next_word();
  }
  // The inverses of Encoder::pop_uniform and pop_choice: put a choice back into the state.
  void push_uniform(uint32_t u, uint32_t k) {  // u < k < 2^16: 32-bit arithmetic
    const uint32_t start = (u << 16) / k;
    give(start, ((u + 1) << 16) / k - start);
  }
  void push_choice(uint32_t c, uint32_t share) { give(c ? 65536u - share : 0, c ? share : 65536u - share); }
  void finish() const {
    if (at_ != size_) throw TopKCodecError(std::to_string(size_ - at_) + " bytes left over after the last symbol");
    const bool zeros = std::all_of(pushed_.begin(), pushed_.end(), [](uint32_t w) { return w == 0; });
    if (x_ != kRansL || !zeros) {
      throw TopKCodecError("the coder does not end in the state it started from (corrupt body)");
    }
  }

 private:
  void give(uint32_t start, uint32_t freq) {
    const uint64_t x_max = ((kRansL >> 16) << 32) * freq;
    if (x_ >= x_max) {
      pushed_.push_back(static_cast<uint32_t>(x_));
      x_ >>= 32;
    }
    x_ = ((x_ / freq) << 16) + (x_ % freq) + start;
  }
  uint32_t next_word() {
    if (!pushed_.empty()) {
      const uint32_t w = pushed_.back();
      pushed_.pop_back();
      return w;
    }
    if (at_ + 4 > size_) throw TopKCodecError("body ends before its last symbol (truncated)");
    uint32_t w = 0;
    for (int b = 0; b < 4; ++b) w |= static_cast<uint32_t>(data_[at_ + b]) << (8 * b);
    at_ += 4;
    return w;
  }

  const uint8_t* data_ = nullptr;
  size_t size_ = 0, at_ = 0;
  uint64_t x_ = 0;
  std::vector<uint32_t> pushed_;  // words put back by give(), read before the body's next word
};

template <class IO>
uint32_t code_number(IO& io, NumberModel& m, uint32_t v) {
  const int want = bit_length(v);
  int e = 0;
  while (e < kMaxClass && io.bit(m.unary[e], want > e)) ++e;
  if (e < 2) return static_cast<uint32_t>(e);
  const uint32_t second = io.bit(m.second[e], (v >> (e - 2)) & 1);
  const uint32_t rest = io.raw(v & ((1u << (e - 2)) - 1), e - 2);
  return (1u << (e - 1)) | (second << (e - 2)) | rest;
}

// ---- the weight table ---------------------------------------------------------------------------
// Weights of the vocabulary in a 16-ary sum tree, flat: level 0 holds the weights, each level above
// the sums of 16 consecutive entries of the one below, up to a level of at most 16 entries; every
// level is padded with zeros to whole blocks of 16. Each block is stored as its running (inclusive)
// sums, so that a search compares 16 entries at once without branches and an update adds to the
// block's tail; both touch one block per level. Totals stay below 2^31, so entries compare as int32.
class SumTree {
 public:
  static std::vector<uint32_t> build(const std::vector<uint32_t>& weights) {
    SumTree t;
    t.shape(weights.size());
    std::vector<uint32_t> data(t.size_, 0);
    std::copy(weights.begin(), weights.end(), data.begin());
    for (int l = 1; l < t.levels_; ++l) {
      for (size_t i = 0; i < t.count_[l - 1]; ++i) data[t.offset_[l] + (i >> 4)] += data[t.offset_[l - 1] + i];
    }
    for (size_t i = 0; i < t.size_; ++i) {
      if (i & 15) data[i] += data[i - 1];
    }
    return data;
  }
  void reset(const std::vector<uint32_t>& built, size_t n) {
    shape(n);
    data_.assign(built.begin(), built.end());
  }
  uint32_t weight(int i) const {
    const size_t at = static_cast<size_t>(i);
    return data_[at] - ((at & 15) ? data_[at - 1] : 0);
  }
  uint64_t total() const { return data_[offset_[levels_ - 1] + 15]; }
  void add(int i, uint32_t delta) {  // delta mod 2^32: a negative delta is 0u - amount
    size_t at = static_cast<size_t>(i);
    for (int l = 0; l < levels_; ++l, at >>= 4) {
      uint32_t* block = data_.data() + offset_[l] + (at & ~size_t{15});
      const int from = static_cast<int>(at & 15);
#ifdef __SSE2__
      const __m128i step = _mm_set1_epi32(static_cast<int>(delta)), first = _mm_set1_epi32(from - 1);
      for (int q = 0; q < 16; q += 4) {
        __m128i* v = reinterpret_cast<__m128i*>(block + q);
        const __m128i lanes = _mm_cmpgt_epi32(_mm_setr_epi32(q, q + 1, q + 2, q + 3), first);
        _mm_storeu_si128(v, _mm_add_epi32(_mm_loadu_si128(v), _mm_and_si128(lanes, step)));
      }
#else
      for (int c = from; c < 16; ++c) block[c] += delta;
#endif
    }
  }
  uint32_t prefix(int i) const {  // the weight of ids [0, i)
    uint32_t s = 0;
    size_t at = static_cast<size_t>(i);
    for (int l = 0; l < levels_; ++l, at >>= 4) {
      if (at & 15) s += data_[offset_[l] + at - 1];
    }
    return s;
  }
  // The id e with prefix(e) <= target < prefix(e + 1), and prefix(e); -1 if target >= total.
  int find(uint32_t target, uint32_t* before) const {
    uint32_t sum = 0;
    size_t at = 0;  // start of the block to search, at the current level
    for (int l = levels_; l-- > 0;) {
      const int32_t* block = reinterpret_cast<const int32_t*>(data_.data() + offset_[l] + at);
      const int32_t rest = static_cast<int32_t>(target - sum);
#ifdef __SSE2__
      const __m128i bound = _mm_set1_epi32(rest);
      int above = 0;  // bit j: block[j] > rest; the sums ascend, so the lowest set bit is the answer
      for (int q = 0; q < 16; q += 4) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + q));
        above |= _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(v, bound))) << q;
      }
      const int c = above ? __builtin_ctz(static_cast<unsigned>(above)) : 16;
#else
      int c = 0;
      while (c < 16 && block[c] <= rest) ++c;
#endif
      if (c == 16) return -1;
      if (c) sum += static_cast<uint32_t>(block[c - 1]);
      at = l > 0 ? (at + c) << 4 : at + c;
    }
    *before = sum;
    return static_cast<int>(at);
  }
  void halve() {  // every weight w -> max(1, w / 2), sums rebuilt
    std::vector<uint32_t> w(count_[0]);
    for (size_t i = 0; i < count_[0]; ++i) w[i] = std::max<uint32_t>(1, weight(static_cast<int>(i)) >> 1);
    reset(build(w), count_[0]);
  }

 private:
  void shape(size_t n) {
    levels_ = 1;
    count_[0] = n;
    offset_[0] = 0;
    while (count_[levels_ - 1] > 16) {
      offset_[levels_] = offset_[levels_ - 1] + (count_[levels_ - 1] + 15) / 16 * 16;
      count_[levels_] = (count_[levels_ - 1] + 15) / 16;
      ++levels_;
    }
    size_ = offset_[levels_ - 1] + 16;
  }

  int levels_ = 1;
  size_t count_[8] = {0}, offset_[8] = {0}, size_ = 0;
  std::vector<uint32_t> data_;
};

// ---- contexts -----------------------------------------------------------------------------------
// Level bucket: the bit length and, from 2 on, the bit below the leading one.
int level_bucket(uint32_t v) {
  const int b = bit_length(v);
  return b < 2 ? b : 2 * b + static_cast<int>((v >> (b - 2)) & 1) - 2;
}
constexpr int kLevelBuckets = 2 * kMaxClass;
int column_bucket(int j) { return j < 4 ? j - 1 : std::min(bit_length(j), 9); }  // j >= 1
constexpr int kColumnBuckets = 10;

// round(sqrt(room)) from integers only, so that the encoder and the decoder always agree.
int64_t rounded_sqrt(int64_t room) {
  if (room <= 0) return 0;
  int64_t r = static_cast<int64_t>(__builtin_sqrt(static_cast<double>(room)));
  while (r * r > room) --r;
  while ((r + 1) * (r + 1) <= room) ++r;
  return room - r * r > r ? r + 1 : r;
}

struct Models {
  NumberModel top[2];  // context: a row with the same input token exists
  NumberModel step[kLevelBuckets * kColumnBuckets];
  NumberModel tail;
  BitModel next_in_first_run[kLevelBuckets];
};

// Ragged coders only: the row's entry count - 1, in the context of its top level.
struct CountModels {
  NumberModel count[kLevelBuckets];
};


// The bonus part of a row's weights: ids in the order they were given, each with its bonus weight,
// in a Fenwick tree over that order. place[id] is 1 + the id's position, 0 if not listed.
class BonusList {
 public:
  void clear(std::vector<int32_t>& place) {
    for (int32_t id : ids_) place[id] = 0;
    ids_.clear();
    weights_.clear();
  }
  void add(int32_t id, uint32_t amount, std::vector<int32_t>& place) {
    if (amount == 0) return;
    if (place[id] == 0) {
      ids_.push_back(id);
      weights_.push_back(0);
      place[id] = static_cast<int32_t>(ids_.size());
    }
    weights_[place[id] - 1] += amount;
  }
  void build() {  // after the last add
    const size_t n = ids_.size();
    tree_.assign(n + 1, 0);
    total_ = 0;
    for (size_t i = 1; i <= n; ++i) {
      tree_[i] += weights_[i - 1];
      total_ += weights_[i - 1];
      const size_t up = i + (i & (~i + 1));
      if (up <= n) tree_[up] += tree_[i];
    }
    top_ = 1;
    while (top_ * 2 <= n) top_ *= 2;
  }
  uint64_t total() const { return total_; }
  int32_t id(int p) const { return ids_[p]; }
  uint32_t weight(int p) const { return weights_[p]; }
  uint32_t prefix(int p) const {  // the weight of positions [0, p)
    uint32_t s = 0;
    for (size_t i = static_cast<size_t>(p); i > 0; i &= i - 1) s += tree_[i];
    return s;
  }
  void remove(int p) {
    const uint32_t w = weights_[p];
    weights_[p] = 0;
    total_ -= w;
    for (size_t i = static_cast<size_t>(p) + 1; i < tree_.size(); i += i & (~i + 1)) tree_[i] -= w;
  }
  // The position p with prefix(p) <= target < prefix(p + 1), and prefix(p); -1 if target >= total.
  int find(uint32_t target, uint32_t* before) const {
    size_t pos = 0;
    uint32_t sum = 0;
    for (size_t step = top_; step; step >>= 1) {
      if (pos + step < tree_.size() && sum + tree_[pos + step] <= target) {
        pos += step;
        sum += tree_[pos];
      }
    }
    *before = sum;
    return pos < ids_.size() ? static_cast<int>(pos) : -1;
  }

 private:
  std::vector<int32_t> ids_;
  std::vector<uint32_t> weights_, tree_;
  uint64_t total_ = 0;
  size_t top_ = 1;
};

// key -> the last row that had it, for one frame: open addressing with linear probing, sized for the
// frame's rows (at most half full), so a lookup is a multiply and usually one probe.
class LastRowMap {
 public:
  void reset(int64_t rows) {
    size_t capacity = 16;
    while (capacity < 2 * static_cast<size_t>(rows)) capacity <<= 1;
    shift_ = 64 - __builtin_ctzll(capacity);
    slots_.assign(capacity, {0, -1});
  }
  int64_t find(uint64_t key) const { return slots_[slot(key)].second; }
  void set(uint64_t key, int64_t row) { slots_[slot(key)] = {key, row}; }

 private:
  size_t slot(uint64_t key) const {  // key's slot, or the empty one where it would go
    const size_t mask = slots_.size() - 1;
    size_t at = static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
    while (slots_[at].second >= 0 && slots_[at].first != key) at = (at + 1) & mask;
    return at;
  }

  int shift_ = 60;
  std::vector<std::pair<uint64_t, int64_t>> slots_;  // (key, row); row -1: empty
};

std::string row_error(int64_t row, const std::string& what) { return "row " + std::to_string(row) + ": " + what; }

// The state of one frame: models and weights start from the prior at every frame, so that each
// sample decodes alone. One per thread, reused (reset) from frame to frame.
class Frame {
 public:
  void reset(const TopKCoder& coder) {
    k_ = coder.k();
    vocab_ = coder.vocab();
    max_level_ = coder.max_level();
    ragged_ = coder.ragged();
    table_.reset(coder.prior_tree(), coder.vocab());
    static const Models kFresh;
    *models_ = kFresh;
    if (ragged_) {
      static const CountModels kFreshCounts;
      *count_models_ = kFreshCounts;
    }
    if (place_.size() != static_cast<size_t>(vocab_)) {
      place_.assign(vocab_, 0);
      bonus_ = BonusList();
    }
    bonus_.clear(place_);
  }

  template <bool kDecode, class IO>
  void code(IO& io, TopKRows& r) {
    last_with_token_.reset(r.rows);
    last_with_pair_.reset(r.rows);
    for (int64_t row = 0; row < r.rows; ++row) code_row<kDecode>(io, r, row);
  }

 private:
  template <bool kDecode, class IO>
  void code_row(IO& io, TopKRows& r, int64_t row) {
    int32_t* ids = r.ids + row * k_;
    int32_t* lv = r.levels + row * k_;
    Models& m = *models_;
    const uint64_t pair =
        (uint64_t{static_cast<uint32_t>(r.prev_context[row])} << 32) | static_cast<uint32_t>(r.context[row]);
    const uint64_t token = static_cast<uint32_t>(r.context[row]);
    const int64_t same_token = last_with_token_.find(token);
    const int64_t same_pair = last_with_pair_.find(pair);

    // Levels.
    uint32_t v = code_number(io, m.top[same_token >= 0], kDecode ? 0 : lv[0] - 1);
    if constexpr (kDecode) {
      if (v >= static_cast<uint32_t>(max_level_)) throw TopKCodecError("decoded a level above the maximum");
      lv[0] = static_cast<int32_t>(v + 1);
    }
    int kr = k_;
    if (ragged_) {
      v = code_number(io, count_models_->count[level_bucket(lv[0])], kDecode ? 0 : r.counts[row] - 1);
      if constexpr (kDecode) {
        if (v >= static_cast<uint32_t>(k_)) throw TopKCodecError("decoded an entry count above K");
        r.counts[row] = static_cast<int32_t>(v + 1);
        for (int j = static_cast<int>(v) + 1; j < k_; ++j) {
          ids[j] = -1;
          lv[j] = 0;
        }
      }
      kr = r.counts[row];
    }
    int64_t sum_sq = static_cast<int64_t>(lv[0]) * lv[0];
    for (int j = 1; j < kr; ++j) {
      const int32_t above = lv[j - 1];
      v = code_number(io, m.step[level_bucket(above) * kColumnBuckets + column_bucket(j)], kDecode ? 0 : above - lv[j]);
      if constexpr (kDecode) {
        if (v >= static_cast<uint32_t>(above)) throw TopKCodecError("decoded a level below 1");
        lv[j] = above - static_cast<int32_t>(v);
      }
      sum_sq += static_cast<int64_t>(lv[j]) * lv[j];
    }
    const int64_t predicted = rounded_sqrt(static_cast<int64_t>(max_level_) * max_level_ - sum_sq);
    const int64_t residual = kDecode ? 0 : r.tail[row] - predicted;
    v = code_number(io, m.tail, static_cast<uint32_t>(residual >= 0 ? 2 * residual : -2 * residual - 1));
    if constexpr (kDecode) {
      const int64_t t = predicted + ((v & 1) ? -static_cast<int64_t>(v >> 1) - 1 : static_cast<int64_t>(v >> 1));
      if (t < 1 || t > max_level_) throw TopKCodecError("decoded a tail level outside [1, max level]");
      r.tail[row] = static_cast<int32_t>(t);
    }

    // Ids: the bonus list first, then each run of equal levels.
    const int32_t next = r.next[row];
    const bool next_known = next >= 0 && next < vocab_;
    const uint32_t base_total = static_cast<uint32_t>(table_.total());
    bonus_.clear(place_);
    // The same row named by several sources is listed once with the sum of their bonuses (the same
    // list as adding them one after the other).
    std::pair<int64_t, uint32_t> sources[3];
    int n_sources = 0;
    for (const auto& [source, amount] : {std::pair<int64_t, uint32_t>{same_token, base_total >> kSameTokenShift},
                                         {same_pair, base_total >> kSamePairShift},
                                         {row - 1, base_total >> kPreviousRowShift}}) {
      if (source < 0) continue;
      int i = 0;
      while (i < n_sources && sources[i].first != source) ++i;
      if (i == n_sources) sources[n_sources++] = {source, 0};
      sources[i].second += amount;
    }
    for (int i = 0; i < n_sources; ++i) {
      const int64_t src = sources[i].first;
      add_bonus(r.ids + src * k_, ragged_ ? r.counts[src] : k_, sources[i].second);
    }
    if (next_known) add_bonus(&next, 1, base_total >> kNextTokenShift);
    bonus_.build();

    removed_.clear();
    for (int a = 0; a < kr;) {
      int b = a + 1;
      while (b < kr && lv[b] == lv[a]) ++b;
      int32_t given = -1;  // the next token, flagged as a member of the first run
      if (a == 0 && next_known) {
        const int flag = kDecode ? 0 : std::find(ids, ids + b, next) != ids + b;
        if (io.bit(m.next_in_first_run[level_bucket(lv[0])], flag, true)) {
          given = next;
          exclude(given);
        }
      }
      if constexpr (kDecode) {
        decode_set(io, ids + a, b - a - (given >= 0));
        if (given >= 0) {
          int32_t* at = std::upper_bound(ids + a, ids + b - 1, given);
          std::move_backward(at, ids + b - 1, ids + b);
          *at = given;
        }
      } else {
        const size_t first = io.members().size();
        for (int j = a; j < b; ++j) {
          const int32_t id = ids[j];
          if (id == given) continue;
          if (table_.weight(id) == 0) {
            throw std::invalid_argument(row_error(row, "id " + std::to_string(id) + " repeats"));
          }
          const int p = place_[id] - 1;
          io.members().push_back({table_.prefix(id), table_.weight(id), p >= 0 ? bonus_.prefix(p) : 0,
                                  p >= 0 ? bonus_.weight(p) : 0, p});
        }
        const uint64_t run_base = table_.total(), run_bonus = bonus_.total();
        for (int j = a; j < b; ++j) {
          if (ids[j] != given) exclude(ids[j]);
        }
        io.put_set(first, static_cast<uint32_t>(run_base), static_cast<uint32_t>(run_bonus));
      }
      a = b;
    }

    // The row's ids return to the base table with one more boost.
    for (const auto& [id, w] : removed_) table_.add(id, w + kBoost);
    if (table_.total() > kHalveAbove) table_.halve();
    last_with_token_.set(token, row);
    last_with_pair_.set(pair, row);
  }

  // Decodes a run of n ids (ascending out), excluding each; after each, puts back which part of the
  // range it was coded in and its rank among the run's ids decoded so far (the choices the encoder
  // took out of the coder state).
  void decode_set(Decoder& io, int32_t* out, int n) {
    for (int t = 0; t < n; ++t) {
      const uint64_t base_total = table_.total(), range = base_total + bonus_.total();
      const uint32_t target = static_cast<uint32_t>(((uint64_t{io.peek(kIdBits)} + 1) * range - 1) >> kIdBits);
      uint32_t before = 0;
      int id;
      uint64_t c, w;
      const bool in_bonus = target >= base_total;
      if (!in_bonus) {
        id = table_.find(target, &before);
        if (id < 0 || id >= vocab_) throw TopKCodecError("decoded an id outside the vocabulary");
        c = before;
        w = table_.weight(id);
      } else {
        const int p = bonus_.find(static_cast<uint32_t>(target - base_total), &before);
        if (p < 0) throw TopKCodecError("decoded a bonus entry outside the list");
        id = bonus_.id(p);
        c = base_total + before;
        w = bonus_.weight(p);
      }
      io.advance(static_cast<uint32_t>((c << kIdBits) / range),
                 static_cast<uint32_t>(((c + w) << kIdBits) / range - (c << kIdBits) / range), kIdBits);
      const int p = place_[id] - 1;
      const uint32_t base = table_.weight(id), bonus = p >= 0 ? bonus_.weight(p) : 0;
      if (base == 0) throw TopKCodecError("decoded an id twice in one row");
      exclude(id);
      if (bonus) io.push_choice(in_bonus, bonus_share(base, bonus));
      int32_t* at = std::upper_bound(out, out + t, id);
      std::move_backward(at, out + t, out + t + 1);
      *at = id;
      if (t > 0) io.push_uniform(static_cast<uint32_t>(at - out), t + 1);
    }
  }

  void add_bonus(const int32_t* ids, int n, uint32_t amount) {
    for (int j = 0; j < n; ++j) bonus_.add(ids[j], amount, place_);
  }
  void exclude(int32_t id) {  // from the base table and the bonus list, until the row ends
    const uint32_t w = table_.weight(id);
    removed_.push_back({id, w});
    table_.add(id, 0u - w);
    if (place_[id]) bonus_.remove(place_[id] - 1);
  }

  int k_ = 0, vocab_ = 0, max_level_ = 0;
  bool ragged_ = false;
  SumTree table_;
  std::unique_ptr<Models> models_ = std::make_unique<Models>();
  std::unique_ptr<CountModels> count_models_ = std::make_unique<CountModels>();
  BonusList bonus_;
  std::vector<int32_t> place_;                          // [vocab] 1 + the id's place in bonus_, or 0
  std::vector<std::pair<int32_t, uint32_t>> removed_;   // the row's excluded ids and their base weights
  LastRowMap last_with_token_;  // input token -> the last row with it
  LastRowMap last_with_pair_;   // (previous token, token) -> the last row with them
};

// Each thread reuses its coder state and buffers from call to call.
struct Workspace {
  std::vector<int32_t> ids, levels;  // the rows to encode, in canonical order
  Encoder encoder;
  Decoder decoder;
  Frame frame;
};

// On the heap, not in thread-local storage itself: code that the compiler specializes for a
// thread-local object looks its address up again at every access (in a shared library).
Workspace& workspace() {
  thread_local std::unique_ptr<Workspace> ws;
  if (!ws) ws = std::make_unique<Workspace>();
  return *ws;
}

}  // namespace

TopKCoder::TopKCoder(int k, int vocab, int max_level, std::vector<uint32_t> prior, bool ragged)
    : k_(k), vocab_(vocab), max_level_(max_level), ragged_(ragged), prior_(std::move(prior)) {
  if (k < 1 || k > 65535) throw std::invalid_argument("k must be in [1, 65535], got " + std::to_string(k));
  if (vocab < k || vocab >= (1 << 30)) {
    throw std::invalid_argument("vocab must be in [k, 2^30), got " + std::to_string(vocab));
  }
  if (max_level < 1 || max_level >= (1 << 20)) {
    throw std::invalid_argument("max_level must be in [1, 2^20), got " + std::to_string(max_level));
  }
  if (static_cast<int64_t>(prior_.size()) != vocab) {
    throw std::invalid_argument("prior has " + std::to_string(prior_.size()) + " weights, expected vocab = " +
                                std::to_string(vocab));
  }
  uint64_t total = 0;
  for (uint32_t w : prior_) {
    if (w < 1 || w > (1u << 23)) throw std::invalid_argument("prior weights must be in [1, 2^23]");
    total += w;
  }
  if (total > (1u << 24)) throw std::invalid_argument("prior weights must sum to at most 2^24");
  prior_tree_ = SumTree::build(prior_);
}

std::vector<uint8_t> TopKCoder::encode(const TopKRows& rows, double* id_bits) const {
  Workspace& ws = workspace();
  if (ragged_ && rows.counts == nullptr) throw std::invalid_argument("a ragged coder needs the rows' counts");
  // Each row in canonical order: level descending, then id ascending (an insertion sort: rows come
  // sorted by probability, so only entries with equal levels move).
  ws.ids.assign(static_cast<size_t>(rows.rows) * k_, -1);
  ws.levels.assign(static_cast<size_t>(rows.rows) * k_, 0);
  for (int64_t row = 0; row < rows.rows; ++row) {
    int32_t* ids = ws.ids.data() + row * k_;
    int32_t* lv = ws.levels.data() + row * k_;
    const int kr = ragged_ ? rows.counts[row] : k_;
    if (kr < 1 || kr > k_) throw std::invalid_argument(row_error(row, "entry count outside [1, K]"));
    for (int j = 0; j < kr; ++j) {
      const int32_t id = rows.ids[row * k_ + j], level = rows.levels[row * k_ + j];
      if (id < 0 || id >= vocab_) throw std::invalid_argument(row_error(row, "id out of range"));
      if (level < 1 || level > max_level_) throw std::invalid_argument(row_error(row, "level out of range"));
      int at = j;
      for (; at > 0 && (lv[at - 1] < level || (lv[at - 1] == level && ids[at - 1] > id)); --at) {
        ids[at] = ids[at - 1];
        lv[at] = lv[at - 1];
      }
      if (at > 0 && lv[at - 1] == level && ids[at - 1] == id) {
        throw std::invalid_argument(row_error(row, "id " + std::to_string(id) + " repeats"));
      }
      ids[at] = id;
      lv[at] = level;
    }
    if (rows.tail[row] < 1 || rows.tail[row] > max_level_) {
      throw std::invalid_argument(row_error(row, "tail level out of range"));
    }
  }
  ws.encoder.reset();
  ws.frame.reset(*this);
  TopKRows sorted = rows;
  sorted.ids = ws.ids.data();
  sorted.levels = ws.levels.data();
  ws.frame.code<false>(ws.encoder, sorted);
  return ws.encoder.finish(id_bits);
}

void TopKCoder::decode(const uint8_t* data, size_t size, TopKRows& rows) const {
  if (ragged_ && rows.counts == nullptr) throw std::invalid_argument("a ragged coder needs a counts array to fill");
  Workspace& ws = workspace();
  ws.decoder.reset(data, size);
  ws.frame.reset(*this);
  ws.frame.code<true>(ws.decoder, rows);
  ws.decoder.finish();
}

}  // namespace kdengine
