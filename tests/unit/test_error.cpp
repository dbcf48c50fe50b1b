#include <gtest/gtest.h>

#include "gradmap/core/error.hpp"
#include "gradmap/core/progress.hpp"

TEST(Error, StacksContextInnermostFirst) {
  try {
    gradmap::with_context("while reading stimuli.h5", [] {
      gradmap::with_context("while checking /stimuli/images",
                            []() -> int { throw gradmap::Error("dtype float32, expected uint8"); });
      return 0;
    });
    FAIL() << "no exception";
  } catch (const gradmap::Error& e) {
    ASSERT_EQ(e.lines().size(), 3u);
    EXPECT_STREQ(e.what(), "dtype float32, expected uint8\n  while checking /stimuli/images\n"
                           "  while reading stimuli.h5");
    EXPECT_FALSE(e.collective);
  }
}

TEST(Error, WrapsForeignExceptions) {
  try {
    gradmap::with_context("while parsing", []() -> int { throw std::runtime_error("boom"); });
    FAIL();
  } catch (const gradmap::Error& e) {
    EXPECT_STREQ(e.what(), "boom\n  while parsing");
  }
}

TEST(Error, UsageErrorsAreCollective) {
  EXPECT_TRUE(gradmap::UsageError("x").collective);
}

TEST(Progress, FormatsDurations) {
  EXPECT_EQ(gradmap::format_duration(4.25), "4.2s");
  EXPECT_EQ(gradmap::format_duration(185), "3m05s");
  EXPECT_EQ(gradmap::format_duration(3720), "1h02m");
}
