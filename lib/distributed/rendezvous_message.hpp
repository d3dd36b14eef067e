#pragma once
// The one message format of the rendezvous, for the file and for the TCP exchange alike:
//
//   header  "RELORARZ" (8 bytes), version (u32), body length (u32)
//   body    kind (u32), rank (u32), world size (u32), key length (u32), key,
//           payload length (u32), payload, FNV-1a 64 of everything before it (u64)
//
// little-endian. The magic and the length in the header let a reader reject a stray TCP peer or a
// foreign file after 16 bytes, before it reads a length it cannot trust; the checksum catches a
// file read while a non-POSIX file system still shows it half written. The key and world size let
// a reader refuse the blob of another job.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace relora {
namespace rendezvous_detail {

constexpr std::size_t kHeaderBytes = 16;
constexpr std::uint32_t kVersion = 1;

enum class MessageKind : std::uint32_t {
  blob = 1,     // rank 0's blob, in the file or in rank 0's answer
  hello = 2,    // a rank asking rank 0 for the blob (TCP)
  refusal = 3,  // rank 0 refusing a hello; the payload says why
  received = 4, // a rank confirming to rank 0 that it has the blob (TCP)
};

struct Message {
  MessageKind kind = MessageKind::blob;
  std::uint32_t rank = 0;
  std::uint32_t world_size = 0;
  std::string key;
  std::vector<std::uint8_t> payload;
};

std::vector<std::uint8_t> encode_message(const Message& message);

// The body length a header announces, or an error: "" when the header is good, else why not.
std::string check_header(const std::uint8_t* header, std::uint32_t& body_bytes);

// Decodes a body whose header check_header accepted; returns "" or why it is not a message.
std::string decode_body(const std::uint8_t* header, const std::vector<std::uint8_t>& body, Message& message);

// Decodes a whole message (header and body); returns "" or why it is not one.
std::string decode_message(const std::vector<std::uint8_t>& bytes, Message& message);

}  // namespace rendezvous_detail
}  // namespace relora
