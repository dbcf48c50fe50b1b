#pragma once
// gradmap::JsonWriter — the one way the stages write JSON (summary.json, aggregate.json): a
// streaming writer that escapes strings (RFC 8259), writes non-finite numbers as null and checks
// that objects, arrays and keys nest, so a name read from an input file cannot break the document.
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace gradmap {

/// Not collective. Builds one JSON document (an object or an array) in memory.
///
/// Numbers: doubles with 10 significant digits (format_number), NaN and +-infinity as null (a
/// missing or undefined statistic); integers exactly. Layout: objects nested fewer than
/// `expanded_depth` containers deep put each member on its own line (indented by two spaces a
/// level); deeper objects and all arrays stay on one line. Misuse (a value without its key in an
/// object, a key in an array, unbalanced ends, str() before the root is closed) throws
/// gradmap::Error.
class JsonWriter {
public:
  explicit JsonWriter(int expanded_depth = 2) : expanded_depth_(expanded_depth) {}

  JsonWriter& begin_object();
  JsonWriter& end_object();
  JsonWriter& begin_array();
  JsonWriter& end_array();
  /// The name of the next member of the current object.
  JsonWriter& key(std::string_view name);

  JsonWriter& value(double v);
  JsonWriter& value(bool v);
  JsonWriter& value(std::string_view s);
  JsonWriter& value(const char* s) { return value(std::string_view(s)); }
  JsonWriter& value(const std::string& s) { return value(std::string_view(s)); }
  /// Any integer type except bool (written exactly).
  template <class I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
  JsonWriter& value(I v) {
    return integer(std::int64_t(v));
  }
  JsonWriter& null();

  /// Arrays of numbers or strings on one line.
  JsonWriter& value(const std::vector<double>& v);
  JsonWriter& value(const std::vector<std::int64_t>& v);
  JsonWriter& value(const std::vector<std::string>& v);

  /// key(name) then value(v).
  template <class T> JsonWriter& member(std::string_view name, const T& v) {
    key(name);
    return value(v);
  }

  /// The document, ending with a newline. Throws unless the root container is closed.
  std::string str() const;

  /// `s` as a JSON string literal, quotes included: `"` and `\` escaped, control characters as
  /// \n, \t, ... or \u00XX; other bytes (UTF-8 included) unchanged.
  static std::string quote(std::string_view s);
  /// `v` as a JSON number (10 significant digits), or null when it is not finite.
  static std::string number(double v);

private:
  struct Frame {
    bool object;
    bool expanded;
    bool empty = true;
  };
  JsonWriter& integer(std::int64_t v);
  void before_value(); // separators, and the checks that a value may come here
  void open(bool object);
  void close(bool object);
  void newline(size_t depth);

  std::string out_;
  std::vector<Frame> stack_;
  int expanded_depth_;
  bool key_pending_ = false;
  bool done_ = false;
};

} // namespace gradmap
