// Decode timing harness for scripts/codec_ablation.py: one build of csrc/topk_codec.cpp (or a patched
// copy, included as SRC) encodes every sample's rows once, then decodes them all `passes` times.
// Prints one JSON line: rows, body bytes and a hash of the bodies, the best pass in seconds, and
// whether every decoded row equals its input in canonical order (level descending, then id ascending).
//
//   g++ -O3 -std=c++17 -DSRC='"csrc/topk_codec.cpp"' -Icsrc scripts/codec_ablation_harness.cpp -o harness
//   ./harness DATA_DIR PASSES
#include SRC

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <utility>

namespace {

template <class T>
std::vector<T> read_array(const std::string& dir, const char* name) {
  std::ifstream f(dir + "/" + name + ".bin", std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error(dir + "/" + name + ".bin: cannot open");
  const size_t size = static_cast<size_t>(f.tellg());
  f.seekg(0);
  std::vector<T> v(size / sizeof(T));
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(size));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s DATA_DIR PASSES\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int passes = std::stoi(argv[2]);
  const int k = read_array<int32_t>(dir, "k")[0];
  const int vocab = read_array<int32_t>(dir, "vocab")[0];
  const int max_level = read_array<int32_t>(dir, "max_level")[0];
  auto ids = read_array<int32_t>(dir, "ids"), levels = read_array<int32_t>(dir, "levels");
  auto tail = read_array<int32_t>(dir, "tail");
  const auto context = read_array<int32_t>(dir, "context"), previous = read_array<int32_t>(dir, "previous");
  const auto next = read_array<int32_t>(dir, "next"), frame_rows = read_array<int32_t>(dir, "frame_rows");
  kdengine::TopKCoder coder(k, vocab, max_level, read_array<uint32_t>(dir, "prior"));

  auto rows_at = [&](int32_t* i, int32_t* l, int32_t* t, size_t at, int32_t n) {
    kdengine::TopKRows r;
    r.rows = n;
    r.ids = i + at * k;
    r.levels = l + at * k;
    r.tail = t + at;
    r.context = context.data() + at;
    r.prev_context = previous.data() + at;
    r.next = next.data() + at;
    return r;
  };
  std::vector<std::vector<uint8_t>> bodies;
  size_t total_rows = 0, body_bytes = 0;
  for (int32_t n : frame_rows) {
    bodies.push_back(coder.encode(rows_at(ids.data(), levels.data(), tail.data(), total_rows, n)));
    body_bytes += bodies.back().size();
    total_rows += static_cast<size_t>(n);
  }

  std::vector<int32_t> out_ids(ids.size()), out_levels(levels.size()), out_tail(tail.size());
  double best = 1e30;
  for (int pass = 0; pass < passes; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    size_t at = 0;
    for (size_t f = 0; f < bodies.size(); ++f) {
      kdengine::TopKRows r = rows_at(out_ids.data(), out_levels.data(), out_tail.data(), at, frame_rows[f]);
      coder.decode(bodies[f].data(), bodies[f].size(), r);
      at += static_cast<size_t>(frame_rows[f]);
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }

  bool round_trip = out_tail == tail;
  std::vector<std::pair<int32_t, int32_t>> row(static_cast<size_t>(k));
  for (size_t r = 0; r < total_rows && round_trip; ++r) {
    for (int j = 0; j < k; ++j) row[j] = {-levels[r * k + j], ids[r * k + j]};
    std::sort(row.begin(), row.end());
    for (int j = 0; j < k; ++j) {
      round_trip = round_trip && out_levels[r * k + j] == -row[j].first && out_ids[r * k + j] == row[j].second;
    }
  }
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over the bodies, frame after frame
  for (const auto& body : bodies) {
    for (uint8_t byte : body) hash = (hash ^ byte) * 1099511628211ull;
  }
  std::printf("{\"rows\": %zu, \"body_bytes\": %zu, \"best_s\": %.9f, \"round_trip\": %s, \"body_hash\": \"%016llx\"}\n",
              total_rows, body_bytes, best, round_trip ? "true" : "false", static_cast<unsigned long long>(hash));
  return 0;
}
