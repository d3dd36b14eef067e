#pragma once
// Loss curves of the regression demo, written as a CSV table and as an SVG line chart. SVG is
// text, so the demo draws its own plot with no plotting library, and the chart can be committed
// and shown in the README as it is.
#include <string>
#include <vector>

namespace relora::demo {

// One training-loss curve per method: losses[m][step] is method m's loss at that step.
// Curves may differ in length (a method stopped early); names.size() must equal losses.size().
// columns: the CSV header's name of each curve, when it differs from the legend's; empty means
// the names, else its size must equal losses.size() too.
struct LossCurves {
  std::vector<std::string> names;
  std::vector<std::vector<double>> losses;
  std::vector<std::string> columns;
};

// Columns: step, then one per method (named in the header row by `columns`, else `names`); one row per step, values with
// 9 significant digits (%.9g), enough to read back a float exactly. A curve shorter than the
// longest leaves its cells empty. Written to a temporary file and renamed over `path`, so a
// reader never sees half a file. Throws IoError naming `path`, ShapeError on mismatched names.
void write_loss_csv(const LossCurves& curves, const std::string& path);

// A line chart: one polyline per method in distinct colours, a log-scale loss axis with a
// gridline and label at each decade that the data spans, a linear step axis, axis labels, a
// legend and `title`. Values <= 0 (a perfect fit) are drawn on the bottom edge and +inf on the
// top edge; NaN points are left out. Written atomically like the CSV; throws IoError naming
// `path`, ShapeError on mismatched names.
void write_loss_svg(const LossCurves& curves, const std::string& path, const std::string& title);

}  // namespace relora::demo
