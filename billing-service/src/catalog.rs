//! The token packages on sale, with prices in the currency's smallest unit.
//!
//! The catalog is built once from the validated config and never changes while the service
//! runs. It owns the savings figure shown to buyers, which is derived from prices rather than
//! configured. It does not own what a buyer was charged: that is recorded per purchase in `db`.

use std::fmt;

use serde::Serialize;

/// A package id as written in the config (`starter`, `pro`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct PackageId(String);

impl PackageId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PackageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A number of tokens. Positive for grants; the ledger also stores negative amounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct Tokens(pub i64);

/// An amount of money in the smallest unit of its currency (US cents for `usd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct Cents(pub i64);

/// One package a buyer can purchase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub id: PackageId,
    /// Display name, e.g. `Starter`.
    pub name: String,
    /// Tokens granted when the purchase is paid.
    pub tokens: Tokens,
    /// Price in the smallest unit of [`Catalog::currency`].
    pub price: Cents,
    /// Highlighted in the shop; at most one package has it.
    pub popular: bool,
}

impl Package {
    /// The product name shown on Stripe's payment page, e.g. `1,000 tokens`.
    pub fn product_name(&self) -> String {
        format!("{} tokens", group_thousands(self.tokens.0))
    }
}

/// The packages on sale, in config order, all priced in one currency.
///
/// # Savings
///
/// The base rate is the highest price per token among the packages. A package's savings is
/// how much cheaper its own rate is, as a whole percentage rounded down so that we never
/// advertise more than the buyer saves:
///
/// ```text
/// savings = floor(100 * (1 - (price / tokens) / (base_price / base_tokens)))
///         = floor(100 * (base_price * tokens - price * base_tokens) / (base_price * tokens))
/// ```
///
/// With the default packages the base rate is starter's 500 cents per 1,000 tokens, so pro
/// (2,000 per 5,000) saves 20 %, enterprise (5,000 per 15,000) 33 % and ultimate 40 %.
#[derive(Clone, Debug)]
pub struct Catalog {
    currency: String,
    packages: Vec<Package>,
}

impl Catalog {
    /// Builds a catalog from packages the config module has already validated (non-empty,
    /// unique ids, positive tokens and prices, lowercase ISO currency).
    pub(crate) fn new(currency: String, packages: Vec<Package>) -> Self {
        Self { currency, packages }
    }

    /// The lowercase ISO 4217 code every price is in, e.g. `usd`.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    pub fn packages(&self) -> &[Package] {
        &self.packages
    }

    pub fn get(&self, id: &str) -> Option<&Package> {
        self.packages
            .iter()
            .find(|package| package.id.as_str() == id)
    }

    /// The package's savings against the base rate, in whole percent (see the type docs).
    pub fn savings_percent(&self, package: &Package) -> u32 {
        let Some(base) = self.base_rate_package() else {
            return 0;
        };
        let (price, tokens) = (i128::from(package.price.0), i128::from(package.tokens.0));
        let (base_price, base_tokens) = (i128::from(base.price.0), i128::from(base.tokens.0));

        let denominator = base_price * tokens;
        if denominator <= 0 {
            return 0;
        }
        let saved = (100 * (base_price * tokens - price * base_tokens)) / denominator;
        u32::try_from(saved.clamp(0, 100)).unwrap_or(0)
    }

    /// The package with the highest price per token. Rates are compared by cross-multiplying,
    /// so no division or rounding is involved.
    fn base_rate_package(&self) -> Option<&Package> {
        self.packages.iter().max_by(|a, b| {
            let a_rate = i128::from(a.price.0) * i128::from(b.tokens.0);
            let b_rate = i128::from(b.price.0) * i128::from(a.tokens.0);
            a_rate.cmp(&b_rate)
        })
    }
}

/// Formats `1000000` as `1,000,000`.
fn group_thousands(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if value < 0 {
        grouped.push('-');
    }
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(id: &str, tokens: i64, price: i64) -> Package {
        Package {
            id: PackageId::new(id),
            name: id.to_owned(),
            tokens: Tokens(tokens),
            price: Cents(price),
            popular: false,
        }
    }

    #[test]
    fn savings_are_measured_against_the_most_expensive_rate() {
        let catalog = Catalog::new(
            "usd".to_owned(),
            vec![
                package("pro", 5_000, 2_000),
                package("starter", 1_000, 500),
                package("enterprise", 15_000, 5_000),
                package("ultimate", 50_000, 15_000),
            ],
        );
        let savings: Vec<u32> = catalog
            .packages()
            .iter()
            .map(|p| catalog.savings_percent(p))
            .collect();
        assert_eq!(savings, vec![20, 0, 33, 40]);
    }

    #[test]
    fn product_names_group_thousands() {
        assert_eq!(package("a", 1_000, 1).product_name(), "1,000 tokens");
        assert_eq!(package("a", 50_000, 1).product_name(), "50,000 tokens");
        assert_eq!(package("a", 999, 1).product_name(), "999 tokens");
        assert_eq!(
            package("a", 1_234_567, 1).product_name(),
            "1,234,567 tokens"
        );
    }
}
