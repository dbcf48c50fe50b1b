// gradmap report: tables, NIfTI maps, figures and an HTML page from a stats directory.
#include "gradmap/report/report.hpp"
#include "command.hpp"

namespace gradmap::cli {

Command report_command() {
  Command c;
  c.name = "report";
  c.usage = "--stats DIR --out DIR";
  c.summary = "From `gradmap stats` output: CSV tables (headline statistics, ROI x layer scores,\n"
              "latency curves, significance counts), NIfTI-1 maps for fMRI (best r, peak layer,\n"
              "minimum q) and, through tools/report.py (matplotlib), PNG figures and a\n"
              "self-contained DIR/index.html.";
  c.options = [](po::options_description& d) {
    d.add_options()("stats", po::value<std::string>()->required(), "stats output directory")(
        "out", po::value<std::string>()->required(), "report directory")(
        "python", po::value<std::string>()->default_value("/usr/bin/python3"),
        "Python with matplotlib and h5py")("script", po::value<std::string>()->default_value(""),
                                           "report.py (default: found beside the binary)");
  };
  c.run = [](const po::variables_map& vm, Context& ctx) {
    report::ReportOptions o;
    o.stats = vm["stats"].as<std::string>();
    o.out = vm["out"].as<std::string>();
    o.python = vm["python"].as<std::string>();
    o.script = vm["script"].as<std::string>();
    report::report(o, ctx.comm);
  };
  return c;
}

} // namespace gradmap::cli
