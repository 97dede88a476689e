//! What a request costs. Money is counted in nano-units (10⁻⁹) of the currency of the route
//! prices, as integers: the replica that served a request computes its cost once, from the
//! prices of the snapshot it served it under, and the control plane adds exactly that number
//! to the key's spend, so the two never disagree by a rounding or a price changed meanwhile.

/// Nano-units in one unit of the currency.
pub const NANOS_PER_UNIT: f64 = 1e9;

/// A model route's prices, in nano-units per token (a price per million tokens × 1 000).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Prices {
    input: f64,
    cached_input: f64,
    cache_write: f64,
    output: f64,
    /// Audio prompt and completion tokens ([`Prices::with_audio`]).
    audio_input: f64,
    audio_output: f64,
    long: Option<LongContext>,
}

/// A route's prices for a long request: one whose prompt (read from and written to the cache
/// included) is more than `above` tokens has its prompt tokens at `input` times their prices
/// and its completion at `output` times, as providers bill a long-context band.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LongContext {
    pub above: u64,
    pub input: f64,
    pub output: f64,
}

/// A request's tokens as they are priced: its prompt, and of it those read from and those
/// written to the provider's prompt cache, and its completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Billed {
    pub prompt: u64,
    /// Of `prompt`, read from the prompt cache.
    pub cached: u64,
    /// Of `prompt`, written to the prompt cache.
    pub cache_write: u64,
    /// Of `cache_write`, written to Anthropic's 1-hour cache, which it bills at twice the
    /// input price (its 5-minute cache at 1.25 times: the route's write price).
    pub cache_write_1h: u64,
    pub completion: u64,
    /// Of `prompt`, audio (OpenAI's `prompt_tokens_details.audio_tokens`), charged at the audio
    /// price as far as the tokens neither read from nor written to the cache hold it: a chat
    /// answer does not say how much of `cached` was audio, so audio read from the cache is
    /// charged at most at the audio price, never below the bill.
    pub audio_prompt: u64,
    /// Of `completion`, audio (`completion_tokens_details.audio_tokens`).
    pub audio_completion: u64,
}

/// What a 1-hour cache write costs, in input prices (Anthropic's rate; a route has one write
/// price, its 5-minute cache's).
pub const ONE_HOUR_WRITE_PER_INPUT: f64 = 2.0;

impl Prices {
    /// From prices per million tokens as routes carry them; prompt tokens read from the cache
    /// cost `cached_input` when given, those written to it `cache_write` when given, else the
    /// input price. Negative or non-finite prices (which validation refuses) count as 0.
    pub fn per_mtok(
        input: f64,
        cached_input: Option<f64>,
        cache_write: Option<f64>,
        output: f64,
    ) -> Self {
        let per_token = |price: f64| {
            if price.is_finite() && price > 0.0 {
                price * (NANOS_PER_UNIT / 1e6)
            } else {
                0.0
            }
        };
        Self {
            input: per_token(input),
            cached_input: per_token(cached_input.unwrap_or(input)),
            cache_write: per_token(cache_write.unwrap_or(input)),
            output: per_token(output),
            audio_input: per_token(input),
            audio_output: per_token(output),
            long: None,
        }
    }

    /// These prices with audio prompt and completion tokens at `input` and `output` per
    /// million when given (else at the text's prices, as before).
    pub fn with_audio(self, input: Option<f64>, output: Option<f64>) -> Self {
        let per_mtok = Self::per_mtok(input.unwrap_or(0.0), None, None, output.unwrap_or(0.0));
        Self {
            audio_input: input.map_or(self.input, |_| per_mtok.input),
            audio_output: output.map_or(self.output, |_| per_mtok.output),
            ..self
        }
    }

    /// These prices with `long`'s for long requests; a multiplier that is not a finite number
    /// from 0 (which validation refuses) counts as 1.
    pub fn with_long_context(self, long: Option<LongContext>) -> Self {
        let multiplier = |m: f64| if m.is_finite() && m >= 0.0 { m } else { 1.0 };
        Self {
            long: long.map(|l| LongContext {
                above: l.above,
                input: multiplier(l.input),
                output: multiplier(l.output),
            }),
            ..self
        }
    }

    /// What a request with `prompt` tokens has its prompt's and its completion's prices
    /// multiplied by: its long-context band's when it is long, else 1.
    fn length_multipliers(&self, prompt: u64) -> (f64, f64) {
        match self.long {
            Some(long) if prompt > long.above => (long.input, long.output),
            _ => (1.0, 1.0),
        }
    }

    /// These prices multiplied by `factor`, a price tier's (a route's `tier_multipliers`):
    /// every kind of token costs `factor` times as much, as providers bill their tiers. A negative or non-finite factor (which validation
    /// refuses) counts as 1.
    pub fn scaled(self, factor: f64) -> Self {
        if !(factor.is_finite() && factor >= 0.0) {
            return self;
        }
        Self {
            input: self.input * factor,
            cached_input: self.cached_input * factor,
            cache_write: self.cache_write * factor,
            output: self.output * factor,
            audio_input: self.audio_input * factor,
            audio_output: self.audio_output * factor,
            long: self.long,
        }
    }

    /// The cost of `tokens`, rounded to the nearest nano-unit. At most `prompt` tokens count
    /// as read from the cache, and at most the rest as written to it (of those, at most all
    /// to the 1-hour cache, at [`ONE_HOUR_WRITE_PER_INPUT`] times the input price): a
    /// confused upstream's figures are no discount and no surcharge past its prompt.
    pub fn cost_nanos(&self, tokens: Billed) -> u64 {
        let cached = tokens.cached.min(tokens.prompt);
        let written = tokens.cache_write.min(tokens.prompt - cached);
        let hour = tokens.cache_write_1h.min(written);
        // Audio among what is neither read from nor written to the cache (how much of `cached`
        // was audio is not reported: at most the audio's price), and among the completion.
        let fresh = tokens.prompt - cached - written;
        let audio_in = tokens.audio_prompt.min(fresh);
        let audio_out = tokens.audio_completion.min(tokens.completion);
        let (long_input, long_output) = self.length_multipliers(tokens.prompt);
        let nanos = ((fresh - audio_in) as f64 * self.input
            + audio_in as f64 * self.audio_input
            + cached as f64 * self.cached_input
            + (written - hour) as f64 * self.cache_write
            + hour as f64 * self.input * ONE_HOUR_WRITE_PER_INPUT)
            * long_input
            + ((tokens.completion - audio_out) as f64 * self.output
                + audio_out as f64 * self.audio_output)
                * long_output;
        // `as` saturates: a cost past u64::MAX (not reachable by bounded token counts) stays there.
        nanos.round() as u64
    }

    /// What a reserve takes for `prompt` tokens before the provider says how it read them:
    /// each at the higher of the input and (5-minute) cache write prices (a prompt's first
    /// turn may be written to the cache whole), at the long-context band's prices when so
    /// many are long. Not a true ceiling: a write to Anthropic's 1-hour cache (twice the
    /// input price) and audio at its own price can cost more (docs/usage.md).
    pub fn prompt_ceiling_nanos(&self, prompt: u64) -> u64 {
        let (long_input, _) = self.length_multipliers(prompt);
        (prompt as f64 * self.input.max(self.cache_write) * long_input).round() as u64
    }
}

/// An amount of the currency (as the API shows it) in nano-units, rounded; negative and
/// non-finite amounts are 0.
pub fn to_nanos(amount: f64) -> u64 {
    if amount.is_finite() && amount > 0.0 {
        (amount * NANOS_PER_UNIT).round() as u64
    } else {
        0
    }
}

/// Nano-units as an amount of the currency.
pub fn from_nanos(nanos: u64) -> f64 {
    nanos as f64 / NANOS_PER_UNIT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_request_is_priced_at_its_band_every_token_of_it() {
        let band = LongContext {
            above: 1_000,
            input: 2.0,
            output: 1.5,
        };
        let prices =
            Prices::per_mtok(3.0, Some(0.3), Some(3.75), 15.0).with_long_context(Some(band));
        let flat = Prices::per_mtok(3.0, Some(0.3), Some(3.75), 15.0);
        let tokens = |prompt| Billed {
            prompt,
            cached: 200,
            cache_write: 300,
            cache_write_1h: 100,
            completion: 500,
            ..Billed::default()
        };
        // At the threshold, the flat prices; one token past it, every token at the band's.
        assert_eq!(
            prices.cost_nanos(tokens(1_000)),
            flat.cost_nanos(tokens(1_000))
        );
        let long = tokens(1_001);
        let output = 500 * 15_000;
        let prompt = flat.cost_nanos(long) - output;
        assert_eq!(prices.cost_nanos(long), 2 * prompt + 3 * output / 2);
        // With a tier too: both apply.
        assert_eq!(
            prices.scaled(2.0).cost_nanos(long),
            2 * prices.cost_nanos(long)
        );
        // The reserve is at the band's input price once the estimate is long.
        assert_eq!(prices.prompt_ceiling_nanos(1_000), 1_000 * 3_750);
        assert_eq!(prices.prompt_ceiling_nanos(1_001), 1_001 * 3_750 * 2);
        // A band's nonsense multiplier counts as 1.
        let odd = flat.with_long_context(Some(LongContext {
            input: f64::NAN,
            output: -1.0,
            ..band
        }));
        assert_eq!(odd.cost_nanos(long), flat.cost_nanos(long));
    }

    #[test]
    fn audio_tokens_are_priced_apart_from_text_when_the_route_says() {
        // gpt-audio: text $2.50 in / $10 out, audio $32 / $64, cached $0.25 per million.
        let text = Prices::per_mtok(2.5, Some(0.25), None, 10.0);
        let audio = text.with_audio(Some(32.0), Some(64.0));
        let tokens = Billed {
            prompt: 1_000,
            cached: 100,
            audio_prompt: 600,
            completion: 500,
            audio_completion: 400,
            ..Billed::default()
        };
        let nanos = |per_mtok: f64, n: u64| (per_mtok * 1_000.0) as u64 * n;
        assert_eq!(
            audio.cost_nanos(tokens),
            nanos(2.5, 300)
                + nanos(32.0, 600)
                + nanos(0.25, 100)
                + nanos(10.0, 100)
                + nanos(64.0, 400)
        );
        // Unset, audio costs what text does; audio past what the counts allow is no more.
        assert_eq!(
            text.cost_nanos(tokens),
            text.cost_nanos(Billed {
                audio_prompt: 0,
                audio_completion: 0,
                ..tokens
            })
        );
        assert_eq!(text.with_audio(None, None), text);
        let confused = Billed {
            audio_prompt: 5_000,
            audio_completion: 5_000,
            ..tokens
        };
        assert_eq!(
            audio.cost_nanos(confused),
            nanos(32.0, 900) + nanos(0.25, 100) + nanos(64.0, 500)
        );
        // A tier and a band multiply audio as every other token.
        assert_eq!(
            audio.scaled(2.0).cost_nanos(tokens),
            2 * audio.cost_nanos(tokens)
        );
    }

    #[test]
    fn a_tier_multiplies_every_kind_of_token() {
        let prices = Prices::per_mtok(3.0, Some(0.3), Some(3.75), 15.0);
        let tokens = Billed {
            prompt: 1_000,
            cached: 200,
            cache_write: 300,
            cache_write_1h: 100,
            completion: 500,
            ..Billed::default()
        };
        let standard = prices.cost_nanos(tokens);
        assert_eq!(prices.scaled(2.0).cost_nanos(tokens), 2 * standard);
        assert_eq!(prices.scaled(0.5).cost_nanos(tokens), standard / 2);
        assert_eq!(prices.scaled(1.0).cost_nanos(tokens), standard);
        for nonsense in [-1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(prices.scaled(nonsense).cost_nanos(tokens), standard);
        }
    }

    #[test]
    fn cached_tokens_cost_the_cached_price_or_else_the_input_price() {
        // $2.50 / $1.25 cached / $10 per million tokens.
        let prices = Prices::per_mtok(2.5, Some(1.25), None, 10.0);
        // 1000 prompt tokens of which 400 cached, 100 completion tokens:
        // 600 × 2500 + 400 × 1250 + 100 × 10000 nano-units.
        assert_eq!(prices.cost_nanos(billed(1000, 400, 0, 100)), 3_000_000);
        let no_cached_price = Prices::per_mtok(2.5, None, None, 10.0);
        assert_eq!(
            no_cached_price.cost_nanos(billed(1000, 400, 0, 100)),
            3_500_000
        );
        // More cached than prompt tokens (a confused upstream) is not a discount past it.
        assert_eq!(prices.cost_nanos(billed(10, 99, 0, 0)), 12_500);
    }

    fn billed(prompt: u64, cached: u64, cache_write: u64, completion: u64) -> Billed {
        Billed {
            prompt,
            cached,
            cache_write,
            completion,
            cache_write_1h: 0,
            ..Billed::default()
        }
    }

    #[test]
    fn one_hour_cache_writes_cost_twice_the_input_price() {
        // Claude Sonnet: $3 input, $3.75 five-minute writes. 10,000 written, 4,000 of them to
        // the 1-hour cache ($6 a million), 100 completion tokens at $15.
        let prices = Prices::per_mtok(3.0, Some(0.3), Some(3.75), 15.0);
        let hour = |cache_write_1h| Billed {
            cache_write_1h,
            ..billed(10_000, 0, 10_000, 100)
        };
        assert_eq!(
            prices.cost_nanos(hour(4_000)),
            6_000 * 3_750 + 4_000 * 6_000 + 100 * 15_000
        );
        // No more 1-hour writes than writes (a confused upstream).
        assert_eq!(
            prices.cost_nanos(hour(99_999)),
            10_000 * 6_000 + 100 * 15_000
        );
        // Without a write price the 5-minute writes cost the input price, the 1-hour twice it.
        let plain = Prices::per_mtok(3.0, None, None, 15.0);
        assert_eq!(
            plain.cost_nanos(hour(4_000)),
            6_000 * 3_000 + 4_000 * 6_000 + 100 * 15_000
        );
    }

    #[test]
    fn tokens_written_to_the_cache_cost_the_write_price_or_else_the_input_price() {
        // Claude Sonnet's prices: $3 input, $0.30 cache reads, $3.75 cache writes, $15 output.
        let prices = Prices::per_mtok(3.0, Some(0.3), Some(3.75), 15.0);
        // 10,000 prompt tokens: 6,000 written, 3,000 read, 1,000 neither; 200 completion:
        // 1000 × 3000 + 3000 × 300 + 6000 × 3750 + 200 × 15000 nano-units.
        assert_eq!(
            prices.cost_nanos(billed(10_000, 3_000, 6_000, 200)),
            29_400_000
        );
        let no_write_price = Prices::per_mtok(3.0, Some(0.3), None, 15.0);
        assert_eq!(
            no_write_price.cost_nanos(billed(10_000, 3_000, 6_000, 200)),
            24_900_000
        );
        // Reads and writes past the prompt (a confused upstream) are bounded by it, reads first.
        assert_eq!(prices.cost_nanos(billed(10, 4, 99, 0)), 4 * 300 + 6 * 3750);
        // Before the answer, a prompt is reserved at the higher of the input and write prices.
        assert_eq!(prices.prompt_ceiling_nanos(1_000), 3_750_000);
        let cheap_writes = Prices::per_mtok(3.0, None, Some(1.0), 15.0);
        assert_eq!(cheap_writes.prompt_ceiling_nanos(1_000), 3_000_000);
    }

    #[test]
    fn the_smallest_prices_in_use_do_not_round_to_nothing() {
        // $0.02 per million tokens: 20 nano-units a token.
        assert_eq!(
            Prices::per_mtok(0.02, None, None, 0.0).cost_nanos(billed(1, 0, 0, 0)),
            20
        );
        assert_eq!(
            Prices::per_mtok(-1.0, Some(f64::NAN), Some(-0.5), f64::INFINITY)
                .cost_nanos(billed(9, 3, 3, 9)),
            0
        );
        assert_eq!(
            Prices::default().cost_nanos(billed(u64::MAX, 0, 0, u64::MAX)),
            0
        );
    }

    #[test]
    fn amounts_convert_both_ways() {
        assert_eq!(to_nanos(50.0), 50_000_000_000);
        assert_eq!(to_nanos(0.000_000_001), 1);
        assert_eq!(to_nanos(-3.0), 0);
        assert_eq!(to_nanos(f64::NAN), 0);
        assert_eq!(from_nanos(1_500_000_000), 1.5);
    }
}
