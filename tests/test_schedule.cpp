// Schedule values at chosen steps, worked out by hand in the comments beside each check.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "relora/core/errors.hpp"
#include "relora/training/schedule.hpp"

using namespace relora;

// Configs are written positionally (C++17 has no designated initialisers), in declaration order:
// {warmup_steps, total_steps, min_lr_ratio, restart_warmup_steps}.

namespace {

constexpr double kPi = 3.14159265358979323846;

// Naive reference: the cosine from 1 to m over [w, T], written straight from the formula.
double cosine_reference(std::int64_t step, std::int64_t w, std::int64_t T, double m) {
  return m + (1 - m) * 0.5 * (1 + std::cos(kPi * double(step - w) / double(T - w)));
}

}  // namespace

TEST_CASE("constant schedule: factor 1, and a linear warmup that starts above 0") {
  ConstantSchedule flat;
  CHECK(flat.factor(0) == 1.0);
  CHECK(flat.factor(1000000) == 1.0);

  ConstantSchedule warm({4});
  CHECK(warm.factor(0) == doctest::Approx(0.25));  // (0 + 1) / 4: the first step is not wasted
  CHECK(warm.factor(1) == doctest::Approx(0.50));
  CHECK(warm.factor(3) == doctest::Approx(1.00));  // the warmup's last step reaches the peak
  CHECK(warm.factor(4) == 1.0);
  CHECK(warm.factor(99) == 1.0);

  warm.on_restart(10);  // a constant schedule ignores restarts
  CHECK(warm.factor(10) == 1.0);
  CHECK(warm.save().restart_steps.empty());
  CHECK(warm.describe() == "constant(warmup_steps=4)");
}

TEST_CASE("warmup-cosine schedule: warmup, cosine midpoint, end and after the end") {
  // w = 10, T = 110, m = 0.1: the cosine runs over the 100 steps 10 .. 110.
  WarmupCosineSchedule s({10, 110, 0.1});
  CHECK(s.factor(0) == doctest::Approx(0.1));   // 1/10
  CHECK(s.factor(4) == doctest::Approx(0.5));   // 5/10
  CHECK(s.factor(9) == doctest::Approx(1.0));   // 10/10
  CHECK(s.factor(10) == doctest::Approx(1.0));  // cos(0): the cosine starts at the peak
  // progress 1/4: 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.1 + 0.9 * 0.853553390593 = 0.868198051534
  CHECK(s.factor(35) == doctest::Approx(0.868198051534).epsilon(1e-12));
  // progress 1/2: 0.1 + 0.9 * 0.5 = 0.55
  CHECK(s.factor(60) == doctest::Approx(0.55).epsilon(1e-12));
  // progress 3/4: 0.1 + 0.9 * 0.146446609407 = 0.231801948466
  CHECK(s.factor(85) == doctest::Approx(0.231801948466).epsilon(1e-12));
  CHECK(s.factor(109) > 0.1);  // one step before the end, still above the floor
  CHECK(s.factor(109) < 0.1 + 1e-3);
  CHECK(s.factor(110) == doctest::Approx(0.1));  // the end
  CHECK(s.factor(111) == 0.1);                   // flat after the end
  CHECK(s.factor(1000000) == 0.1);

  for (std::int64_t t = 10; t <= 110; ++t) {
    INFO("step " << t);
    CHECK(s.factor(t) == doctest::Approx(cosine_reference(t, 10, 110, 0.1)).epsilon(1e-12));
  }
}

TEST_CASE("warmup-cosine schedule: no warmup, warmup as long as the run, min_lr_ratio 0 and 1") {
  WarmupCosineSchedule no_warmup({0, 100, 0.0});
  CHECK(no_warmup.factor(0) == 1.0);
  CHECK(no_warmup.factor(50) == doctest::Approx(0.5));
  CHECK(no_warmup.factor(100) == 0.0);

  WarmupCosineSchedule all_warmup({8, 8, 0.2});
  CHECK(all_warmup.factor(7) == doctest::Approx(1.0));
  CHECK(all_warmup.factor(8) == doctest::Approx(0.2));  // no cosine phase, straight to the floor

  WarmupCosineSchedule flat({0, 10, 1.0});
  for (std::int64_t t = 0; t < 20; ++t) CHECK(flat.factor(t) == doctest::Approx(1.0));
}

TEST_CASE("warmup-cosine schedule: the envelope is continuous and non-increasing after warmup") {
  const std::int64_t w = 20, T = 500;
  const double m = 0.05;
  WarmupCosineSchedule s({w, T, m});
  // The cosine's slope is at most (1 - m) * pi / 2 / (T - w) per step.
  const double max_jump = (1 - m) * kPi / 2 / double(T - w) + 1e-12;
  double largest_jump = 0;
  for (std::int64_t t = w; t < T + 10; ++t) {
    const double jump = s.factor(t) - s.factor(t + 1);
    CHECK(jump >= 0.0);
    largest_jump = std::max(largest_jump, jump);
  }
  INFO("largest step-to-step change " << largest_jump << ", bound " << max_jump);
  CHECK(largest_jump <= max_jump);
  // The warmup joins the cosine without a jump: its last step already reaches 1.
  CHECK(s.factor(w - 1) == doctest::Approx(s.factor(w)));
}

TEST_CASE("jagged cosine: before any restart it is the warmup-cosine") {
  const JaggedCosineScheduleConfig config{
      .warmup_steps = 5, .total_steps = 200, .min_lr_ratio = 0.1, .restart_warmup_steps = 10};
  JaggedCosineSchedule jagged(config);
  WarmupCosineSchedule plain({5, 200, 0.1});
  for (std::int64_t t = 0; t < 220; ++t) CHECK(jagged.factor(t) == plain.factor(t));
}

TEST_CASE("jagged cosine: re-warmup after one restart and after two") {
  // No initial warmup, T = 100, m = 0: envelope(t) = (1 + cos(pi t / 100)) / 2.
  JaggedCosineSchedule s({0, 100, 0.0, 4});
  const auto envelope = [](std::int64_t t) { return cosine_reference(t, 0, 100, 0.0); };

  s.on_restart(50);
  CHECK(s.factor(49) == doctest::Approx(envelope(49)));  // the step before: untouched
  CHECK(s.factor(50) == doctest::Approx(0.125));         // envelope 0.5 times 1/4
  CHECK(s.factor(51) == doctest::Approx(envelope(51) * 0.50));
  CHECK(s.factor(52) == doctest::Approx(envelope(52) * 0.75));
  CHECK(s.factor(53) == doctest::Approx(envelope(53)));  // 4/4: back on the cosine
  CHECK(s.factor(54) == doctest::Approx(envelope(54)));
  CHECK(s.factor(60) == doctest::Approx(envelope(60)));

  s.on_restart(75);
  // envelope(75) = (1 + cos(3 pi / 4)) / 2 = 0.146446609407; times 1/4 = 0.036611652352
  CHECK(s.factor(75) == doctest::Approx(0.036611652352).epsilon(1e-10));
  CHECK(s.factor(76) == doctest::Approx(envelope(76) * 0.50));
  CHECK(s.factor(78) == doctest::Approx(envelope(78)));
  // The first restart's ramp is still answered for its own steps.
  CHECK(s.factor(50) == doctest::Approx(0.125));
  CHECK(s.factor(74) == doctest::Approx(envelope(74)));

  // A restart after the end of the run ramps up to the floor (0 here), then stays on it.
  s.on_restart(120);
  CHECK(s.factor(120) == 0.0);

  CHECK((s.restart_steps() == std::vector<std::int64_t>{50, 75, 120}));
  CHECK(s.describe() ==
        "jagged_cosine(warmup_steps=0, total_steps=100, min_lr_ratio=0, "
        "restart_warmup_steps=4, restarts=3)");
}

TEST_CASE("jagged cosine: the re-warmup never exceeds the envelope and starts above 0") {
  JaggedCosineSchedule s({10, 300, 0.1, 10});
  WarmupCosineSchedule envelope({10, 300, 0.1});
  for (std::int64_t r = 50; r < 300; r += 50) s.on_restart(r);
  for (std::int64_t t = 0; t < 320; ++t) {
    INFO("step " << t);
    CHECK(s.factor(t) > 0.0);
    CHECK(s.factor(t) <= envelope.factor(t));
    if (t >= 50 && t < 300 && t % 50 == 0)
      CHECK(s.factor(t) == doctest::Approx(envelope.factor(t) / 10));
    if (t > 50 && t < 300 && t % 50 == 9) CHECK(s.factor(t) == doctest::Approx(envelope.factor(t)));
  }
}

TEST_CASE("jagged cosine: restarts with restart_warmup_steps 0 leave the rate alone") {
  JaggedCosineSchedule s({0, 100, 0.1, 0});
  WarmupCosineSchedule plain({0, 100});
  s.on_restart(30);
  for (std::int64_t t = 0; t < 110; ++t) CHECK(s.factor(t) == plain.factor(t));
}

TEST_CASE("jagged cosine: restart order") {
  JaggedCosineSchedule s({0, 100, 0.1, 5});
  s.on_restart(20);
  s.on_restart(20);  // the same restart replayed after a resume: recorded once
  CHECK(s.restart_steps().size() == 1);
  CHECK_THROWS_WITH_AS(s.on_restart(10),
                       "jagged cosine schedule: restart at step 10 comes before the last "
                       "recorded restart at step 20",
                       ConfigError);
  CHECK_THROWS_WITH_AS(s.on_restart(-1), "restart step must be >= 0, got -1", ConfigError);
}

TEST_CASE("schedules: save and restore give the same values") {
  const JaggedCosineScheduleConfig config{
      .warmup_steps = 3, .total_steps = 120, .min_lr_ratio = 0.2, .restart_warmup_steps = 6};
  JaggedCosineSchedule original(config);
  original.on_restart(40);
  original.on_restart(80);
  const ScheduleState state = original.save();
  CHECK((state.restart_steps == std::vector<std::int64_t>{40, 80}));

  JaggedCosineSchedule resumed(config);
  resumed.restore(state);
  for (std::int64_t t = 0; t < 130; ++t) CHECK(resumed.factor(t) == original.factor(t));
  // Training goes on identically after the resume.
  original.on_restart(100);
  resumed.on_restart(100);
  for (std::int64_t t = 95; t < 130; ++t) CHECK(resumed.factor(t) == original.factor(t));

  // Restoring an empty state forgets the restarts.
  resumed.restore({});
  CHECK(resumed.restart_steps().empty());

  // Schedules that ignore restarts round-trip their (empty) state.
  WarmupCosineSchedule cosine({0, 10});
  CHECK_NOTHROW(cosine.restore(cosine.save()));
  ConstantSchedule constant;
  CHECK_NOTHROW(constant.restore(constant.save()));
}

TEST_CASE("schedules: restore rejects states the schedule could not have produced") {
  JaggedCosineSchedule jagged({0, 100});
  CHECK_THROWS_WITH_AS(jagged.restore({{30, 20}}),
                       "schedule state: restart steps must be strictly increasing, got 30 then 20",
                       ConfigError);
  CHECK_THROWS_WITH_AS(jagged.restore({{10, 10}}),
                       "schedule state: restart steps must be strictly increasing, got 10 then 10",
                       ConfigError);
  CHECK_THROWS_WITH_AS(jagged.restore({{-5}}), "restart step must be >= 0, got -5", ConfigError);
  // A failed restore keeps the old state.
  jagged.on_restart(7);
  CHECK_THROWS_AS(jagged.restore({{3, 1}}), ConfigError);
  CHECK((jagged.restart_steps() == std::vector<std::int64_t>{7}));

  WarmupCosineSchedule cosine({0, 10});
  CHECK_THROWS_WITH_AS(cosine.restore({{5}}),
                       "warmup_cosine(warmup_steps=0, total_steps=10, min_lr_ratio=0.1) ignores "
                       "restarts, but the state to restore holds 1 restart step(s)",
                       ConfigError);
  ConstantSchedule constant;
  CHECK_THROWS_AS(constant.restore({{5, 6}}), ConfigError);
}

TEST_CASE("schedules: every validation error names the value") {
  CHECK_THROWS_WITH_AS(ConstantSchedule({-1}),
                       "constant schedule: warmup_steps must be >= 0, got -1", ConfigError);

  CHECK_THROWS_WITH_AS(WarmupCosineSchedule({}),
                       "warmup-cosine schedule: total_steps must be > 0 (the run's length), got 0",
                       ConfigError);
  CHECK_THROWS_WITH_AS(WarmupCosineSchedule({0, -3}),
                       "warmup-cosine schedule: total_steps must be > 0 (the run's length), got -3",
                       ConfigError);
  CHECK_THROWS_WITH_AS(WarmupCosineSchedule({-2, 10}),
                       "warmup-cosine schedule: warmup_steps must be >= 0, got -2", ConfigError);
  CHECK_THROWS_WITH_AS(WarmupCosineSchedule({11, 10}),
                       "warmup-cosine schedule: warmup_steps (11) must not exceed total_steps (10)",
                       ConfigError);
  CHECK_THROWS_WITH_AS(WarmupCosineSchedule({0, 10, -0.1}),
                       "warmup-cosine schedule: min_lr_ratio must be in [0, 1], got -0.1",
                       ConfigError);
  CHECK_THROWS_WITH_AS(WarmupCosineSchedule({0, 10, 1.5}),
                       "warmup-cosine schedule: min_lr_ratio must be in [0, 1], got 1.5",
                       ConfigError);
  CHECK_THROWS_WITH_AS(WarmupCosineSchedule({0, 10, std::numeric_limits<double>::quiet_NaN()}),
                       "warmup-cosine schedule: min_lr_ratio must be in [0, 1], got nan",
                       ConfigError);

  // The jagged schedule shares the cosine's checks under its own name, and adds its own.
  CHECK_THROWS_WITH_AS(JaggedCosineSchedule({20, 10}),
                       "jagged cosine schedule: warmup_steps (20) must not exceed total_steps (10)",
                       ConfigError);
  CHECK_THROWS_WITH_AS(JaggedCosineSchedule({0, 10, 2.0}),
                       "jagged cosine schedule: min_lr_ratio must be in [0, 1], got 2",
                       ConfigError);
  CHECK_THROWS_WITH_AS(JaggedCosineSchedule({0, 0}),
                       "jagged cosine schedule: total_steps must be > 0 (the run's length), got 0",
                       ConfigError);
  CHECK_THROWS_WITH_AS(JaggedCosineSchedule({0, 100, 0.1, -1}),
                       "jagged cosine schedule: restart_warmup_steps must be >= 0, got -1",
                       ConfigError);
  CHECK_THROWS_WITH_AS(
      JaggedCosineSchedule({0, 10, 0.1, 11}),
      "jagged cosine schedule: restart_warmup_steps (11) must not exceed total_steps (10)",
      ConfigError);

  // The free validate() functions are the same checks, usable before building a schedule.
  CHECK_NOTHROW(validate(WarmupCosineScheduleConfig{0, 1}));
  CHECK_THROWS_AS(validate(JaggedCosineScheduleConfig{}), ConfigError);

  // A negative step is a caller's bug, reported rather than extrapolated.
  WarmupCosineSchedule s({0, 10});
  CHECK_THROWS_WITH_AS(s.factor(-1), "step must be >= 0, got -1", ConfigError);
  CHECK_THROWS_AS(ConstantSchedule().factor(-1), ConfigError);
  CHECK_THROWS_AS(JaggedCosineSchedule({0, 10}).factor(-7), ConfigError);
}
