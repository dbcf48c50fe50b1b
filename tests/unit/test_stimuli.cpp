// The procedural stimuli: deterministic, varied, and covering every category.
#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "gradmap/sim/stimuli.hpp"

using namespace gradmap::sim;

TEST(Stimuli, ImageIsAFunctionOfSeedAndIndex) {
  std::vector<std::uint8_t> a(32 * 32 * 3), b(a.size()), c(a.size());
  EXPECT_EQ(render_stimulus(5, 17, 32, a.data()), render_stimulus(5, 17, 32, b.data()));
  EXPECT_EQ(a, b);
  render_stimulus(6, 17, 32, c.data());
  EXPECT_NE(a, c);
}

TEST(Stimuli, AllCategoriesAppearAndImagesVary) {
  std::set<std::int64_t> cats;
  std::set<std::vector<std::uint8_t>> distinct;
  for (int i = 0; i < 200; ++i) {
    std::vector<std::uint8_t> img(24 * 24 * 3);
    const auto k = render_stimulus(1, i, 24, img.data());
    ASSERT_GE(k, 0);
    ASSERT_LT(k, kStimulusCategories);
    cats.insert(k);
    // Not a flat image: pixel values spread.
    int mn = 255, mx = 0;
    for (auto v : img) {
      mn = std::min<int>(mn, v);
      mx = std::max<int>(mx, v);
    }
    EXPECT_GT(mx - mn, 10) << "image " << i << " is nearly flat";
    distinct.insert(img);
  }
  EXPECT_EQ(cats.size(), static_cast<size_t>(kStimulusCategories));
  EXPECT_EQ(distinct.size(), 200u);
}
