#include "loss_plot.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <limits>

#include "relora/core/errors.hpp"

namespace relora::demo {
namespace {

// --- files ------------------------------------------------------------------------------------

// Writes next to `path` and renames over it: rename() within one folder is atomic on POSIX, so
// an interrupted run leaves the old file or the new one, never a truncated one.
void write_file_atomically(const std::string& content, const std::string& path, const char* what) {
  const std::string temp = path + ".tmp";
  const auto fail = [&](const std::string& action, int error) {
    std::remove(temp.c_str());
    throw IoError(std::string("cannot write ") + what + " to '" + path + "': " + action + ": " +
                  std::strerror(error));
  };
  std::FILE* file = std::fopen(temp.c_str(), "wb");
  if (file == nullptr) fail("cannot open '" + temp + "'", errno);
  const std::size_t written = std::fwrite(content.data(), 1, content.size(), file);
  const int write_error = errno;
  if (std::fclose(file) != 0) fail("close failed", errno);
  if (written != content.size()) fail("short write", write_error);
  if (std::rename(temp.c_str(), path.c_str()) != 0) fail("cannot rename '" + temp + "'", errno);
}

void require_matching_names(const LossCurves& curves) {
  if (curves.names.size() != curves.losses.size()) {
    throw ShapeError("LossCurves: " + std::to_string(curves.names.size()) + " names but " +
                     std::to_string(curves.losses.size()) + " loss curves");
  }
}

std::size_t longest_curve(const LossCurves& curves) {
  std::size_t steps = 0;
  for (const auto& curve : curves.losses) steps = std::max(steps, curve.size());
  return steps;
}

// printf into a std::string; the SVG is a few hundred short formatted pieces.
std::string format(const char* pattern, ...) {
  va_list args;
  va_start(args, pattern);
  va_list args_again;
  va_copy(args_again, args);
  const int length = std::vsnprintf(nullptr, 0, pattern, args);
  va_end(args);
  std::string out(static_cast<std::size_t>(std::max(length, 0)) + 1, '\0');
  std::vsnprintf(out.data(), out.size(), pattern, args_again);
  va_end(args_again);
  out.pop_back();  // the terminating NUL vsnprintf wrote
  return out;
}

// --- CSV --------------------------------------------------------------------------------------

// RFC 4180: a field holding a comma, quote or line break is quoted, its quotes doubled.
std::string csv_field(const std::string& text) {
  if (text.find_first_of(",\"\r\n") == std::string::npos) return text;
  std::string quoted = "\"";
  for (char c : text) quoted += (c == '"') ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

// --- SVG --------------------------------------------------------------------------------------

std::string xml_escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// Tableau 10: distinct in hue and lightness, and readable by most colour-blind viewers. Past ten
// methods the colours repeat with a dash pattern, so every line stays distinguishable.
constexpr const char* kPalette[] = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                                    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"};
constexpr std::size_t kPaletteSize = sizeof kPalette / sizeof kPalette[0];
constexpr const char* kFont = "Helvetica, Arial, sans-serif";

// Pixel geometry of the chart. The legend sits right of the plot so it can never hide a curve.
struct Layout {
  double plot_left = 80, plot_top = 50, plot_width = 600, plot_height = 380;
  double legend_gap = 20, legend_width = 0, right_margin = 20, bottom_margin = 60;
  double plot_right() const { return plot_left + plot_width; }
  double plot_bottom() const { return plot_top + plot_height; }
  double width() const { return plot_right() + legend_gap + legend_width + right_margin; }
  double height() const { return plot_bottom() + bottom_margin; }
};

// The loss axis covers whole decades [10^low, 10^high] around every finite positive value.
struct DecadeRange {
  int low = -1, high = 1;
};

DecadeRange decade_range(const LossCurves& curves) {
  double smallest = std::numeric_limits<double>::infinity(), largest = 0;
  for (const auto& curve : curves.losses) {
    for (double loss : curve) {
      if (!(loss > 0) || !std::isfinite(loss)) continue;
      smallest = std::min(smallest, loss);
      largest = std::max(largest, loss);
    }
  }
  if (largest == 0) return {};  // nothing to plot: an empty chart from 0.1 to 10
  DecadeRange range{static_cast<int>(std::floor(std::log10(smallest))),
                    static_cast<int>(std::ceil(std::log10(largest)))};
  if (range.high == range.low) ++range.high;  // a flat curve on an exact power of ten
  return range;
}

// 0.001 ... 1000 read best as decimals; beyond, 1e-5 and 1e6 stay short.
std::string decade_label(int decade) {
  if (decade >= -3 && decade <= 3) return format("%g", std::pow(10.0, decade));
  return format("1e%d", decade);
}

// A "nice" tick spacing (1, 2 or 5 times a power of ten) giving at most about `target` ticks.
double nice_tick_spacing(double span, int target) {
  const double raw = span / target;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  for (double multiple : {1.0, 2.0, 5.0}) {
    if (multiple * magnitude >= raw) return multiple * magnitude;
  }
  return 10 * magnitude;
}

class Chart {
 public:
  Chart(const LossCurves& curves, const std::string& title)
      : curves_(curves), title_(title), decades_(decade_range(curves)) {
    const std::size_t steps = longest_curve(curves);
    const double last_step = steps > 1 ? static_cast<double>(steps - 1) : 1.0;
    // The step axis ends on a tick: 300 steps (0 .. 299) get an axis to 300, labelled there.
    step_tick_ = std::max(1.0, nice_tick_spacing(last_step, 8));
    step_axis_end_ = std::ceil(last_step / step_tick_) * step_tick_;
    std::size_t longest_name = 0;
    for (const auto& name : curves.names) longest_name = std::max(longest_name, name.size());
    // About 6.5 px per character at 12 px; the swatch and padding take 50 px.
    layout_.legend_width = std::max(100.0, 6.5 * static_cast<double>(longest_name) + 50.0);
  }

  std::string render() const {
    std::string svg = format(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
        "viewBox=\"0 0 %.0f %.0f\" font-family=\"%s\" font-size=\"12\">\n",
        layout_.width(), layout_.height(), layout_.width(), layout_.height(), kFont);
    svg += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    svg += format(
        "<text x=\"%.1f\" y=\"30\" font-size=\"16\" font-weight=\"bold\" "
        "text-anchor=\"middle\">%s</text>\n",
        layout_.plot_left + layout_.plot_width / 2, xml_escape(title_).c_str());
    svg += loss_axis();
    svg += step_axis();
    svg += format(
        "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" "
        "stroke=\"#444\"/>\n",
        layout_.plot_left, layout_.plot_top, layout_.plot_width, layout_.plot_height);
    svg += curves();
    svg += legend();
    svg += "</svg>\n";
    return svg;
  }

 private:
  double x_of(double step) const {
    return layout_.plot_left + step / step_axis_end_ * layout_.plot_width;
  }

  // Log scale: equal ratios of loss are equal distances. Clamped to the axis for 0 and +inf.
  double y_of(double loss) const {
    const double span = decades_.high - decades_.low;
    double decade = loss > 0 ? std::log10(loss) : decades_.low;
    decade = std::clamp(decade, double(decades_.low), double(decades_.high));
    return layout_.plot_top + (decades_.high - decade) / span * layout_.plot_height;
  }

  std::string horizontal_line(double y, const char* colour, double width) const {
    return format(
        "<line x1=\"%.1f\" y1=\"%.2f\" x2=\"%.1f\" y2=\"%.2f\" stroke=\"%s\" "
        "stroke-width=\"%.1f\"/>\n",
        layout_.plot_left, y, layout_.plot_right(), y, colour, width);
  }

  std::string loss_axis() const {
    std::string out = "<g class=\"loss-axis\">\n";
    const int decades = decades_.high - decades_.low;
    // Minor lines at 2..9 x 10^d help read values between decades, but crowd a tall range.
    if (decades <= 6) {
      for (int d = decades_.low; d < decades_.high; ++d) {
        for (int m = 2; m <= 9; ++m)
          out += horizontal_line(y_of(m * std::pow(10.0, d)), "#f0f0f0", 1);
      }
    }
    const int label_every = std::max(1, (decades + 7) / 8);
    for (int d = decades_.low; d <= decades_.high; ++d) {
      const double y = y_of(std::pow(10.0, d));
      out += horizontal_line(y, "#d0d0d0", 1);
      if ((d - decades_.low) % label_every != 0) continue;
      out += format(
          "<text x=\"%.1f\" y=\"%.2f\" text-anchor=\"end\" dominant-baseline=\"middle\" "
          "fill=\"#333\">%s</text>\n",
          layout_.plot_left - 8, y, decade_label(d).c_str());
    }
    const double middle = layout_.plot_top + layout_.plot_height / 2;
    out += format(
        "<text x=\"22\" y=\"%.1f\" text-anchor=\"middle\" fill=\"#222\" "
        "transform=\"rotate(-90 22 %.1f)\">training loss (MSE, log scale)</text>\n",
        middle, middle);
    return out + "</g>\n";
  }

  std::string step_axis() const {
    std::string out = "<g class=\"step-axis\">\n";
    for (double step = 0; step <= step_axis_end_ + 1e-9; step += step_tick_) {
      const double x = x_of(step);
      out += format("<line x1=\"%.2f\" y1=\"%.1f\" x2=\"%.2f\" y2=\"%.1f\" stroke=\"#d0d0d0\"/>\n",
                    x, layout_.plot_top, x, layout_.plot_bottom());
      out += format("<line x1=\"%.2f\" y1=\"%.1f\" x2=\"%.2f\" y2=\"%.1f\" stroke=\"#444\"/>\n", x,
                    layout_.plot_bottom(), x, layout_.plot_bottom() + 5);
      out +=
          format("<text x=\"%.2f\" y=\"%.1f\" text-anchor=\"middle\" fill=\"#333\">%.0f</text>\n",
                 x, layout_.plot_bottom() + 20, step);
    }
    out += format("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" fill=\"#222\">step</text>\n",
                  layout_.plot_left + layout_.plot_width / 2, layout_.plot_bottom() + 45);
    return out + "</g>\n";
  }

  static std::string dash_of(std::size_t method) {
    return method < kPaletteSize ? "" : " stroke-dasharray=\"6 3\"";
  }

  std::string curves() const {
    // The clip keeps a line drawn to an edge (0 or +inf) from spilling over the frame.
    std::string out = format(
        "<clipPath id=\"plot-area\"><rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" "
        "height=\"%.1f\"/></clipPath>\n<g class=\"curves\" clip-path=\"url(#plot-area)\" "
        "fill=\"none\" stroke-width=\"2\" stroke-linejoin=\"round\" stroke-linecap=\"round\">\n",
        layout_.plot_left, layout_.plot_top, layout_.plot_width, layout_.plot_height);
    for (std::size_t m = 0; m < curves_.losses.size(); ++m) {
      std::string points;
      const auto& curve = curves_.losses[m];
      for (std::size_t step = 0; step < curve.size(); ++step) {
        if (std::isnan(curve[step])) continue;
        if (!points.empty()) points += ' ';
        points += format("%.2f,%.2f", x_of(double(step)), y_of(curve[step]));
      }
      out += format("<polyline stroke=\"%s\"%s points=\"", kPalette[m % kPaletteSize],
                    dash_of(m).c_str());
      out += points + "\"/>\n";
    }
    return out + "</g>\n";
  }

  std::string legend() const {
    if (curves_.names.empty()) return "";
    const double row_height = 20;
    const double left = layout_.plot_right() + layout_.legend_gap;
    const double height = row_height * double(curves_.names.size()) + 12;
    std::string out = "<g class=\"legend\">\n";
    out += format(
        "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"white\" "
        "stroke=\"#ccc\" rx=\"3\"/>\n",
        left, layout_.plot_top, layout_.legend_width, height);
    for (std::size_t m = 0; m < curves_.names.size(); ++m) {
      const double y = layout_.plot_top + 16 + row_height * double(m);
      out += format(
          "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
          "stroke-width=\"2.5\"%s/>\n",
          left + 10, y, left + 34, y, kPalette[m % kPaletteSize], dash_of(m).c_str());
      out += format("<text x=\"%.1f\" y=\"%.1f\" dominant-baseline=\"middle\" fill=\"#222\">",
                    left + 40, y);
      out += xml_escape(curves_.names[m]) + "</text>\n";
    }
    return out + "</g>\n";
  }

  const LossCurves& curves_;
  std::string title_;
  DecadeRange decades_;
  double step_tick_ = 1, step_axis_end_ = 1;
  Layout layout_;
};

}  // namespace

void write_loss_csv(const LossCurves& curves, const std::string& path) {
  require_matching_names(curves);
  if (!curves.columns.empty() && curves.columns.size() != curves.losses.size()) {
    throw ShapeError("LossCurves: " + std::to_string(curves.columns.size()) + " CSV columns but " +
                     std::to_string(curves.losses.size()) + " loss curves");
  }
  const std::vector<std::string>& header = curves.columns.empty() ? curves.names : curves.columns;
  std::string csv = "step";
  for (const auto& name : header) csv.append(1, ',').append(csv_field(name));
  csv += "\n";
  const std::size_t steps = longest_curve(curves);
  for (std::size_t step = 0; step < steps; ++step) {
    csv += std::to_string(step);
    for (const auto& curve : curves.losses) {
      csv += ",";
      if (step < curve.size()) csv += format("%.9g", curve[step]);
    }
    csv += "\n";
  }
  write_file_atomically(csv, path, "loss CSV");
}

void write_loss_svg(const LossCurves& curves, const std::string& path, const std::string& title) {
  require_matching_names(curves);
  write_file_atomically(Chart(curves, title).render(), path, "loss chart");
}

}  // namespace relora::demo
