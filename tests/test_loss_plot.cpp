// The regression demo's CSV and SVG writers (apps/regression/loss_plot.cpp, compiled into the
// test binary by tests/CMakeLists.txt).
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "loss_plot.hpp"
#include "relora/core/errors.hpp"

using relora::demo::LossCurves;
using relora::demo::write_loss_csv;
using relora::demo::write_loss_svg;
namespace fs = std::filesystem;

namespace {

// A fresh folder per test case, removed at the end.
struct ScratchDir {
  fs::path path;
  explicit ScratchDir(const std::string& name)
      : path(fs::temp_directory_path() / ("relora_test_loss_plot_" + name)) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~ScratchDir() { fs::remove_all(path); }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

std::size_t count(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// Naive well-formedness check: every element opened is closed in order, or is self-closing,
// and no text holds a raw '<' (the writer must escape it).
bool tags_balance(const std::string& svg, std::string& problem) {
  std::vector<std::string> open;
  for (std::size_t at = svg.find('<'); at != std::string::npos; at = svg.find('<', at + 1)) {
    const std::size_t end = svg.find('>', at);
    if (end == std::string::npos) return problem = "unterminated tag", false;
    const std::string tag = svg.substr(at + 1, end - at - 1);
    if (tag.find('<') != std::string::npos) return problem = "'<' inside " + tag, false;
    const std::string name = tag.substr(0, tag.find_first_of(" \n/", tag[0] == '/' ? 1 : 0));
    if (tag[0] == '/') {
      if (open.empty() || "/" + open.back() != name) return problem = "stray </" + name, false;
      open.pop_back();
    } else if (tag.back() != '/') {
      open.push_back(name);
    }
    at = end;
  }
  if (!open.empty()) return problem = "unclosed <" + open.back() + ">", false;
  return true;
}

// The (x, y) pairs of the `index`-th polyline.
std::vector<std::pair<double, double>> polyline_points(const std::string& svg, std::size_t index) {
  std::size_t at = svg.find("<polyline");
  for (std::size_t i = 0; i < index; ++i) at = svg.find("<polyline", at + 1);
  REQUIRE(at != std::string::npos);
  const std::size_t begin = svg.find("points=\"", at) + 8;
  std::istringstream points(svg.substr(begin, svg.find('"', begin) - begin));
  std::vector<std::pair<double, double>> xy;
  double x, y;
  char comma;
  while (points >> x >> comma >> y) xy.emplace_back(x, y);
  return xy;
}

}  // namespace

TEST_CASE("loss CSV: exact content for a tiny input") {
  ScratchDir dir("csv");
  const LossCurves curves{{"full", "lora, rank 4", "relora"},
                          {{1.5, 0.25, 1.0 / 3.0}, {2, 1e-10}, {6.90512345678, 0.1, 0.0094}}};
  const std::string path = dir.file("losses.csv");
  write_loss_csv(curves, path);
  // A name holding a comma is quoted; the shorter curve leaves its last cell empty; 9 digits.
  CHECK(read_text(path) ==
        "step,full,\"lora, rank 4\",relora\n"
        "0,1.5,2,6.90512346\n"
        "1,0.25,1e-10,0.1\n"
        "2,0.333333333,,0.0094\n");
  CHECK_FALSE(fs::exists(path + ".tmp"));

  // Writing again replaces the file whole.
  write_loss_csv({{"a"}, {{4}}}, path);
  CHECK(read_text(path) == "step,a\n0,4\n");

  write_loss_csv({}, path);
  CHECK(read_text(path) == "step\n");

  // Header names of their own for the CSV, as the demo's DoRA columns; the legend keeps `names`.
  write_loss_csv({{"LoRA", "DoRA"}, {{1}, {2}}, {"LoRA", "dora"}}, path);
  CHECK(read_text(path) == "step,LoRA,dora\n0,1,2\n");
}

TEST_CASE("loss SVG: well formed, one polyline per method, legend, title, axis labels") {
  ScratchDir dir("svg");
  LossCurves curves{{"full fine-tuning", "LoRA", "ReLoRA <T=50>"}, {{}, {}, {}}};
  for (int step = 0; step < 300; ++step) {
    curves.losses[0].push_back(0.018 + 6.9 * std::exp(-step / 20.0));
    curves.losses[1].push_back(0.32 + 6.6 * std::exp(-step / 15.0));
    curves.losses[2].push_back(0.0094 + 6.9 * std::exp(-step / 30.0));
  }
  const std::string path = dir.file("losses.svg");
  write_loss_svg(curves, path, "LoRA vs ReLoRA & full fine-tuning");
  const std::string svg = read_text(path);

  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK(svg.find("xmlns=\"http://www.w3.org/2000/svg\"") != std::string::npos);
  std::string problem;
  INFO("well-formedness: " << problem);
  CHECK(tags_balance(svg, problem));
  CHECK(count(svg, "<polyline") == 3);
  CHECK(svg.find(">full fine-tuning</text>") != std::string::npos);
  CHECK(svg.find(">LoRA</text>") != std::string::npos);
  CHECK(svg.find(">ReLoRA &lt;T=50&gt;</text>") != std::string::npos);
  CHECK(svg.find(">LoRA vs ReLoRA &amp; full fine-tuning</text>") != std::string::npos);
  CHECK(svg.find(">step</text>") != std::string::npos);
  CHECK(svg.find(">training loss (MSE, log scale)</text>") != std::string::npos);
  // The data span 0.0094 .. 6.92: decades 0.001 to 10, each labelled.
  for (const char* label :
       {">0.001</text>", ">0.01</text>", ">0.1</text>", ">1</text>", ">10</text>"}) {
    CHECK(svg.find(label) != std::string::npos);
  }
  CHECK(svg.find(">100</text>") != std::string::npos);  // a step tick, not a loss label
  CHECK(svg.find(">0.0001</text>") == std::string::npos);
  // Distinct colours.
  CHECK(count(svg, "stroke=\"#4e79a7\"") >= 1);
  CHECK(count(svg, "stroke=\"#f28e2b\"") >= 1);
  CHECK(count(svg, "stroke=\"#e15759\"") >= 1);

  // A falling loss is a line going down the page: SVG y grows at every step.
  const auto relora = polyline_points(svg, 2);
  REQUIRE(relora.size() == 300);
  for (std::size_t i = 1; i < relora.size(); ++i) {
    INFO("point " << i);
    CHECK(relora[i].first > relora[i - 1].first);
    CHECK(relora[i].second > relora[i - 1].second);
  }
}

TEST_CASE("loss SVG: the loss axis is logarithmic") {
  ScratchDir dir("log");
  const std::string path = dir.file("log.svg");
  // Each step divides the loss by 10: on a log axis, equal vertical steps.
  write_loss_svg({{"geometric"}, {{10, 1, 0.1, 0.01, 0.001}}}, path, "log scale");
  const auto xy = polyline_points(read_text(path), 0);
  REQUIRE(xy.size() == 5);
  const double first_gap = xy[1].second - xy[0].second;
  CHECK(first_gap > 0);
  for (std::size_t i = 2; i < xy.size(); ++i) {
    INFO("gap " << i << ": " << xy[i].second - xy[i - 1].second << " vs " << first_gap);
    CHECK(xy[i].second - xy[i - 1].second == doctest::Approx(first_gap).epsilon(1e-3));
    CHECK(xy[i].first - xy[i - 1].first == doctest::Approx(xy[1].first - xy[0].first));
  }
}

TEST_CASE("loss SVG: zero, negative, infinite and NaN losses") {
  ScratchDir dir("odd");
  const std::string path = dir.file("odd.svg");
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  write_loss_svg({{"odd", "empty"}, {{2, 0, nan, inf, 0.5, -2}, {}}}, path, "odd values");
  const std::string svg = read_text(path);
  // No "nan" or "inf" written as a coordinate (the text "dominant-baseline" holds "nan").
  for (const char* bad : {",nan", "nan,", ",inf", "inf,", ",-nan", "-inf"}) {
    CHECK(svg.find(bad) == std::string::npos);
  }
  CHECK(count(svg, "<polyline") == 2);
  const auto xy = polyline_points(svg, 0);
  REQUIRE(xy.size() == 5);              // the NaN point is left out
  CHECK(xy[1].second == xy[4].second);  // 0 and -2 both sit on the bottom edge
  CHECK(xy[1].second > xy[0].second);   // ... below the real values
  CHECK(xy[2].second < xy[0].second);   // +inf sits on the top edge
  CHECK(polyline_points(svg, 1).empty());

  // Nothing plottable at all still gives a valid, empty chart.
  write_loss_svg({{"nothing"}, {{nan, 0}}}, path, "empty");
  std::string problem;
  CHECK(tags_balance(read_text(path), problem));
  write_loss_svg({}, path, "no methods");
  CHECK(tags_balance(read_text(path), problem));
}

TEST_CASE("loss CSV and SVG: errors name the path and leave no temporary file") {
  const LossCurves curves{{"a"}, {{1, 0.5}}};
  const std::string missing = "/nonexistent-relora-dir/losses.csv";
  CHECK_THROWS_WITH_AS(write_loss_csv(curves, missing), doctest::Contains(missing.c_str()),
                       relora::IoError);
  CHECK_THROWS_WITH_AS(write_loss_svg(curves, "/nonexistent-relora-dir/losses.svg", "t"),
                       doctest::Contains("'/nonexistent-relora-dir/losses.svg'"), relora::IoError);

  // The rename fails when a folder stands at the path; the temporary file must not linger.
  ScratchDir dir("errors");
  const std::string folder = dir.file("taken");
  fs::create_directories(fs::path(folder) / "child");
  CHECK_THROWS_WITH_AS(write_loss_csv(curves, folder), doctest::Contains(folder.c_str()), relora::IoError);
  CHECK_FALSE(fs::exists(folder + ".tmp"));

  CHECK_THROWS_WITH_AS(write_loss_csv({{"a", "b"}, {{1}}}, dir.file("x.csv")),
                       "LossCurves: 2 names but 1 loss curves", relora::ShapeError);
  CHECK_THROWS_WITH_AS(write_loss_csv({{"a"}, {{1}}, {"a", "b"}}, dir.file("x.csv")),
                       "LossCurves: 2 CSV columns but 1 loss curves", relora::ShapeError);
  CHECK_THROWS_AS(write_loss_svg({{}, {{1}}}, dir.file("x.svg"), "t"), relora::ShapeError);
}
