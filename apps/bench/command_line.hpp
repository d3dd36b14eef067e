#pragma once
// A bench mode's command line, read one option at a time: the option, its value, a number or a
// whole number with a lower bound, the backend, a comma-separated list of known names. Every
// refusal goes to the mode's usage(), which prints the reason and exits.
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "relora/relora.hpp"

namespace relora_bench {

// The non-empty parts of s between separators.
inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::stringstream in(s);
  std::string part;
  while (std::getline(in, part, sep)) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

class CommandLine {
 public:
  using Usage = void (*)(const char* why);  // prints why (or the help when null) and exits

  // Reads argv[first], argv[first + 1], ...
  CommandLine(int argc, char** argv, int first, Usage usage)
      : argc_(argc), argv_(argv), at_(first - 1), usage_(usage) {}

  // Moves to the next option; false after the last.
  bool next() {
    if (++at_ >= argc_) return false;
    option_ = argv_[at_];
    return true;
  }
  bool is(const char* name) const { return option_ == name; }

  std::string value() {
    if (at_ + 1 >= argc_) refuse(option_ + " needs a value");
    return argv_[++at_];
  }
  double number(double lowest) {
    const std::string text = value();
    char* end = nullptr;
    const double x = std::strtod(text.c_str(), &end);
    if (end == text.c_str() || *end != '\0' || !(x >= lowest)) refuse(option_ + ": bad value '" + text + "'");
    return x;
  }
  long whole(long lowest) {
    const std::string text = value();
    char* end = nullptr;
    const long x = std::strtol(text.c_str(), &end, 10);
    if (end == text.c_str() || *end != '\0' || x < lowest) refuse(option_ + ": bad value '" + text + "'");
    return x;
  }
  relora::Device device() {
    const std::string text = value();
    if (text == "cpu") return relora::Device::cpu;
    if (text == "cuda") return relora::Device::cuda;
    refuse(option_ + ": '" + text + "' is neither cpu nor cuda");
  }
  // The value's comma-separated names, each of which known() accepts.
  std::vector<std::string> names(const std::function<bool(const std::string&)>& known) {
    std::vector<std::string> list = split(value(), ',');
    if (list.empty()) refuse(option_ + " needs at least one name");
    for (const std::string& name : list) {
      if (!known(name)) refuse(option_ + ": unknown case '" + name + "'");
    }
    return list;
  }

  [[noreturn]] void refuse(const std::string& why) const {
    usage_(why.c_str());
    std::exit(2);
  }
  [[noreturn]] void refuse_unknown() const { refuse("unknown argument '" + option_ + "'"); }

 private:
  int argc_;
  char** argv_;
  int at_;
  Usage usage_;
  std::string option_;
};

}  // namespace relora_bench
