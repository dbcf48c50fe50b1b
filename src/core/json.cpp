// gradmap::JsonWriter: see json.hpp.
#include "gradmap/core/json.hpp"

#include <cstdio>

#include "gradmap/core/error.hpp"
#include "gradmap/core/text.hpp"

namespace gradmap {

std::string JsonWriter::quote(std::string_view s) {
  std::string q = "\"";
  for (const char c : s) {
    switch (c) {
    case '"': q += "\\\""; break;
    case '\\': q += "\\\\"; break;
    case '\n': q += "\\n"; break;
    case '\r': q += "\\r"; break;
    case '\t': q += "\\t"; break;
    case '\b': q += "\\b"; break;
    case '\f': q += "\\f"; break;
    default:
      if (static_cast<unsigned char>(c) < 0x20) { // RFC 8259: every other control character
        char u[8];
        std::snprintf(u, sizeof u, "\\u%04x", unsigned(static_cast<unsigned char>(c)));
        q += u;
      } else {
        q += c;
      }
    }
  }
  return q + "\"";
}

std::string JsonWriter::number(double v) {
  return format_number(v, 10, "null");
}

void JsonWriter::newline(size_t depth) {
  out_ += '\n';
  out_.append(2 * depth, ' ');
}

void JsonWriter::before_value() {
  GM_REQUIRE(!done_, "JsonWriter: a value after the end of the document");
  if (stack_.empty())
    return;
  Frame& top = stack_.back();
  if (top.object) {
    GM_REQUIRE(key_pending_, "JsonWriter: a value in an object needs a key first");
    key_pending_ = false;
    return;
  }
  if (!top.empty)
    out_ += ", ";
  top.empty = false;
}

JsonWriter& JsonWriter::key(std::string_view name) {
  GM_REQUIRE(!stack_.empty() && stack_.back().object && !key_pending_,
             "JsonWriter: key \"" + std::string(name) + "\" outside an object or after a key");
  Frame& top = stack_.back();
  if (top.expanded) {
    if (!top.empty)
      out_ += ',';
    newline(stack_.size());
  } else if (!top.empty) {
    out_ += ", ";
  }
  top.empty = false;
  out_ += quote(name) + ": ";
  key_pending_ = true;
  return *this;
}

void JsonWriter::open(bool object) {
  before_value();
  const bool expanded = object && int(stack_.size()) < expanded_depth_;
  stack_.push_back(Frame{object, expanded});
  out_ += object ? '{' : '[';
}

void JsonWriter::close(bool object) {
  GM_REQUIRE(!stack_.empty() && stack_.back().object == object && !key_pending_,
             std::string("JsonWriter: unbalanced end_") + (object ? "object" : "array"));
  const Frame top = stack_.back();
  stack_.pop_back();
  if (top.expanded && !top.empty)
    newline(stack_.size());
  out_ += object ? '}' : ']';
  done_ = stack_.empty();
}

JsonWriter& JsonWriter::begin_object() {
  open(true);
  return *this;
}
JsonWriter& JsonWriter::end_object() {
  close(true);
  return *this;
}
JsonWriter& JsonWriter::begin_array() {
  open(false);
  return *this;
}
JsonWriter& JsonWriter::end_array() {
  close(false);
  return *this;
}

JsonWriter& JsonWriter::value(double v) {
  before_value();
  out_ += number(v);
  return *this;
}

JsonWriter& JsonWriter::value(bool v) {
  before_value();
  out_ += v ? "true" : "false";
  return *this;
}

JsonWriter& JsonWriter::value(std::string_view s) {
  before_value();
  out_ += quote(s);
  return *this;
}

JsonWriter& JsonWriter::integer(std::int64_t v) {
  before_value();
  out_ += std::to_string(v);
  return *this;
}

JsonWriter& JsonWriter::null() {
  before_value();
  out_ += "null";
  return *this;
}

JsonWriter& JsonWriter::value(const std::vector<double>& v) {
  begin_array();
  for (double x : v)
    value(x);
  return end_array();
}

JsonWriter& JsonWriter::value(const std::vector<std::int64_t>& v) {
  begin_array();
  for (std::int64_t x : v)
    value(x);
  return end_array();
}

JsonWriter& JsonWriter::value(const std::vector<std::string>& v) {
  begin_array();
  for (const auto& x : v)
    value(x);
  return end_array();
}

std::string JsonWriter::str() const {
  GM_REQUIRE(done_, "JsonWriter: the document is not complete");
  return out_ + "\n";
}

} // namespace gradmap
