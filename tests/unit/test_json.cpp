#include <gtest/gtest.h>

// Boost 1.74's property_tree pulls in boost/bind.hpp, which warns unless told this.
#define BOOST_BIND_GLOBAL_PLACEHOLDERS
#include <boost/property_tree/json_parser.hpp>
#include <boost/property_tree/ptree.hpp>

#include <cmath>
#include <limits>
#include <sstream>

#include "gradmap/core/error.hpp"
#include "gradmap/core/json.hpp"

using gradmap::JsonWriter;

TEST(JsonWriter, EscapesQuoteBackslashAndControlCharacters) {
  EXPECT_EQ(JsonWriter::quote("V1"), "\"V1\"");
  EXPECT_EQ(JsonWriter::quote("a\"b"), "\"a\\\"b\"");
  EXPECT_EQ(JsonWriter::quote("a\\b"), "\"a\\\\b\"");
  EXPECT_EQ(JsonWriter::quote("line\nnext\ttab\r"), "\"line\\nnext\\ttab\\r\"");
  EXPECT_EQ(JsonWriter::quote(std::string("a\x01z\x1f", 4)), "\"a\\u0001z\\u001f\"");
  EXPECT_EQ(JsonWriter::quote("\xc3\xa9t\xc3\xa9"), "\"\xc3\xa9t\xc3\xa9\""); // UTF-8 unchanged
}

TEST(JsonWriter, NonFiniteNumbersAreNullFiniteOnesHaveTenDigits) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  JsonWriter w;
  w.begin_array().value(nan).value(inf).value(-inf).value(1.0 / 3.0).value(0.05).value(1e-7);
  w.value(std::int64_t{-12}).value(size_t{7}).value(true).value(false).null().end_array();
  EXPECT_EQ(w.str(), "[null, null, null, 0.3333333333, 0.05, 1e-07, -12, 7, true, false, null]\n");
}

TEST(JsonWriter, NestsObjectsAndArraysWithExpandedTopLevels) {
  JsonWriter w(2);
  w.begin_object();
  w.member("q", 0.05).member("name", "x");
  w.key("fmri").begin_object();
  w.member("layers", std::vector<std::string>{"conv1", "fc"});
  w.key("significant").begin_object();
  w.key("activations").begin_object().member("bh", std::vector<std::int64_t>{1, 2}).end_object();
  w.end_object();
  w.key("ci").begin_array().begin_array().value(1.5).value(2.5).end_array().end_array();
  w.key("empty").begin_object().end_object();
  w.end_object();
  w.end_object();
  EXPECT_EQ(w.str(), "{\n"
                     "  \"q\": 0.05,\n"
                     "  \"name\": \"x\",\n"
                     "  \"fmri\": {\n"
                     "    \"layers\": [\"conv1\", \"fc\"],\n"
                     "    \"significant\": {\"activations\": {\"bh\": [1, 2]}},\n"
                     "    \"ci\": [[1.5, 2.5]],\n"
                     "    \"empty\": {}\n"
                     "  }\n"
                     "}\n");
}

TEST(JsonWriter, NamesWithQuotesRoundTripThroughAParser) {
  const std::string roi = "V1 \"left\"\\dorsal\nx";
  JsonWriter w(1); // only the root expanded
  w.begin_object().key(roi).begin_object().member("label", roi).end_object().end_object();
  EXPECT_EQ(w.str(), "{\n  \"V1 \\\"left\\\"\\\\dorsal\\nx\": {\"label\": "
                     "\"V1 \\\"left\\\"\\\\dorsal\\nx\"}\n}\n");
  // An independent parser (Boost.PropertyTree's JSON reader) reads the name back unchanged.
  std::istringstream in(w.str());
  boost::property_tree::ptree tree;
  boost::property_tree::read_json(in, tree);
  ASSERT_EQ(tree.size(), 1u);
  EXPECT_EQ(tree.begin()->first, roi);
  EXPECT_EQ(tree.begin()->second.get<std::string>("label"), roi);
}

TEST(JsonWriter, RejectsMisuse) {
  {
    JsonWriter w;
    w.begin_object();
    EXPECT_THROW(w.value(1.0), gradmap::Error); // a member without a key
    EXPECT_THROW(w.str(), gradmap::Error);      // not closed
    EXPECT_THROW(w.end_array(), gradmap::Error);
  }
  {
    JsonWriter w;
    w.begin_array();
    EXPECT_THROW(w.key("k"), gradmap::Error);
    w.end_array();
    EXPECT_THROW(w.value(1.0), gradmap::Error); // a second root
  }
}
