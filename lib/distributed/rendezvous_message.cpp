#include "distributed/rendezvous_message.hpp"

#include <cstring>

#include "io/little_endian.hpp"
#include "relora/distributed/rendezvous.hpp"
#include "relora/io/checksum.hpp"

namespace relora {
namespace rendezvous_detail {
namespace {

constexpr char kMagic[8] = {'R', 'E', 'L', 'O', 'R', 'A', 'R', 'Z'};
// The largest body: the blob, a key of up to 4 KiB and the fixed fields.
constexpr std::uint32_t kMaxBodyBytes = kMaxRendezvousBlobBytes + 4096 + 64;

void append_u32(std::vector<std::uint8_t>& bytes, std::uint32_t value) {
  std::uint8_t word[4];
  store_le<std::uint32_t>(value, word);
  bytes.insert(bytes.end(), word, word + 4);
}

// Reads fields off a body in order; any read past the end marks it short.
class Reader {
 public:
  Reader(const std::vector<std::uint8_t>& bytes, std::size_t end) : bytes_(bytes), end_(end) {}
  bool short_read() const { return short_; }
  std::size_t position() const { return at_; }
  std::uint32_t u32() {
    if (!take(4)) return 0;
    return load_le<std::uint32_t>(bytes_.data() + at_ - 4);
  }
  const std::uint8_t* bytes(std::size_t count) { return take(count) ? bytes_.data() + at_ - count : nullptr; }

 private:
  bool take(std::size_t count) {
    if (short_ || end_ - at_ < count) {
      short_ = true;
      return false;
    }
    at_ += count;
    return true;
  }
  const std::vector<std::uint8_t>& bytes_;
  std::size_t end_;
  std::size_t at_ = 0;
  bool short_ = false;
};

}  // namespace

std::vector<std::uint8_t> encode_message(const Message& message) {
  std::vector<std::uint8_t> body;
  append_u32(body, static_cast<std::uint32_t>(message.kind));
  append_u32(body, message.rank);
  append_u32(body, message.world_size);
  append_u32(body, static_cast<std::uint32_t>(message.key.size()));
  body.insert(body.end(), message.key.begin(), message.key.end());
  append_u32(body, static_cast<std::uint32_t>(message.payload.size()));
  body.insert(body.end(), message.payload.begin(), message.payload.end());

  std::vector<std::uint8_t> bytes(kMagic, kMagic + sizeof kMagic);
  append_u32(bytes, kVersion);
  append_u32(bytes, static_cast<std::uint32_t>(body.size() + 8));
  bytes.insert(bytes.end(), body.begin(), body.end());
  std::uint8_t checksum[8];
  store_le<std::uint64_t>(fnv1a64(bytes.data(), bytes.size()), checksum);
  bytes.insert(bytes.end(), checksum, checksum + 8);
  return bytes;
}

std::string check_header(const std::uint8_t* header, std::uint32_t& body_bytes) {
  if (std::memcmp(header, kMagic, sizeof kMagic) != 0) return "not a relora rendezvous message (bad magic)";
  const std::uint32_t version = load_le<std::uint32_t>(header + 8);
  if (version != kVersion) {
    return "rendezvous message of version " + std::to_string(version) + ", expected " + std::to_string(kVersion);
  }
  body_bytes = load_le<std::uint32_t>(header + 12);
  if (body_bytes < 28 || body_bytes > kMaxBodyBytes) {
    return "rendezvous message announces a body of " + std::to_string(body_bytes) + " bytes, outside [28, " +
           std::to_string(kMaxBodyBytes) + "]";
  }
  return "";
}

std::string decode_body(const std::uint8_t* header, const std::vector<std::uint8_t>& body, Message& message) {
  if (body.size() < 8) return "rendezvous message too short for its checksum";
  Fnv1a64 hash;
  hash.update(header, kHeaderBytes);
  hash.update(body.data(), body.size() - 8);
  if (hash.value() != load_le<std::uint64_t>(body.data() + body.size() - 8)) {
    return "rendezvous message fails its checksum (truncated or corrupt)";
  }
  Reader reader(body, body.size() - 8);
  const std::uint32_t kind = reader.u32();
  message.rank = reader.u32();
  message.world_size = reader.u32();
  const std::uint32_t key_bytes = reader.u32();
  const std::uint8_t* key = reader.bytes(key_bytes);
  const std::uint32_t payload_bytes = reader.u32();
  const std::uint8_t* payload = reader.bytes(payload_bytes);
  if (reader.short_read() || reader.position() != body.size() - 8) {
    return "rendezvous message's fields do not fill its body";
  }
  if (kind < 1 || kind > 4) return "rendezvous message of unknown kind " + std::to_string(kind);
  if (payload_bytes > kMaxRendezvousBlobBytes) {
    return "rendezvous payload of " + std::to_string(payload_bytes) + " bytes, above the limit";
  }
  message.kind = static_cast<MessageKind>(kind);
  message.key.assign(reinterpret_cast<const char*>(key), key_bytes);
  message.payload.assign(payload, payload + payload_bytes);
  return "";
}

std::string decode_message(const std::vector<std::uint8_t>& bytes, Message& message) {
  if (bytes.size() < kHeaderBytes) return "rendezvous message shorter than its header";
  std::uint32_t body_bytes = 0;
  std::string why = check_header(bytes.data(), body_bytes);
  if (!why.empty()) return why;
  if (bytes.size() != kHeaderBytes + body_bytes) {
    return "rendezvous message of " + std::to_string(bytes.size()) + " bytes, its header announces " +
           std::to_string(kHeaderBytes + body_bytes);
  }
  const std::vector<std::uint8_t> body(bytes.begin() + kHeaderBytes, bytes.end());
  return decode_body(bytes.data(), body, message);
}

}  // namespace rendezvous_detail
}  // namespace relora
