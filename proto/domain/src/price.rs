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
    output: f64,
}

impl Prices {
    /// From prices per million tokens as routes carry them; cached prompt tokens cost
    /// `cached_input` when given, else the input price. Negative or non-finite prices
    /// (which validation refuses) count as 0.
    pub fn per_mtok(input: f64, cached_input: Option<f64>, output: f64) -> Self {
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
            output: per_token(output),
        }
    }

    /// The cost of `prompt` tokens, `cached` of them from the prompt cache (at most
    /// `prompt` count as such), and `completion` tokens, rounded to the nearest nano-unit.
    pub fn cost_nanos(&self, prompt: u64, cached: u64, completion: u64) -> u64 {
        let cached = cached.min(prompt);
        let nanos = (prompt - cached) as f64 * self.input
            + cached as f64 * self.cached_input
            + completion as f64 * self.output;
        // `as` saturates: a cost past u64::MAX (not reachable by bounded token counts) stays there.
        nanos.round() as u64
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
    fn cached_tokens_cost_the_cached_price_or_else_the_input_price() {
        // $2.50 / $1.25 cached / $10 per million tokens.
        let prices = Prices::per_mtok(2.5, Some(1.25), 10.0);
        // 1000 prompt tokens of which 400 cached, 100 completion tokens:
        // 600 × 2500 + 400 × 1250 + 100 × 10000 nano-units.
        assert_eq!(prices.cost_nanos(1000, 400, 100), 3_000_000);
        let no_cached_price = Prices::per_mtok(2.5, None, 10.0);
        assert_eq!(no_cached_price.cost_nanos(1000, 400, 100), 3_500_000);
        // More cached than prompt tokens (a confused upstream) is not a discount past it.
        assert_eq!(prices.cost_nanos(10, 99, 0), 12_500);
    }

    #[test]
    fn the_smallest_prices_in_use_do_not_round_to_nothing() {
        // $0.02 per million tokens: 20 nano-units a token.
        assert_eq!(Prices::per_mtok(0.02, None, 0.0).cost_nanos(1, 0, 0), 20);
        assert_eq!(
            Prices::per_mtok(-1.0, Some(f64::NAN), f64::INFINITY).cost_nanos(9, 9, 9),
            0
        );
        assert_eq!(Prices::default().cost_nanos(u64::MAX, 0, u64::MAX), 0);
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
