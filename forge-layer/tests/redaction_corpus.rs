//! Recall and false positives of the redactor on a generated corpus, reported per type.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use forge_layer::redact::{Kind, Redactor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const N: usize = 1000;

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

fn alnum(rng: &mut StdRng, n: usize) -> String {
    const SET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| SET[rng.random_range(0..SET.len())] as char)
        .collect()
}

fn digits(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

fn luhn_complete(prefix_and_body: &str) -> String {
    // Append the check digit that makes the whole number pass Luhn.
    let sum: u32 = prefix_and_body
        .chars()
        .rev()
        .enumerate()
        .map(|(i, c)| {
            let d = c.to_digit(10).unwrap();
            if i % 2 == 0 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    format!("{prefix_and_body}{}", (10 - sum % 10) % 10)
}

fn iban(rng: &mut StdRng) -> String {
    let (country, len) =
        [("DE", 18), ("GB", 18), ("FR", 23), ("NL", 14), ("ES", 20)][rng.random_range(0..5)];
    let bban: String = if country == "GB" || country == "NL" {
        let bank: String = (0..4)
            .map(|_| char::from(b'A' + rng.random_range(0..26u8)))
            .collect();
        format!("{bank}{}", digits(rng, len - 4))
    } else {
        digits(rng, len)
    };
    // ISO 7064 mod 97-10: check digits make (bban + country + "00") mod 97 == 1.
    let numeric: String = format!("{bban}{country}00")
        .chars()
        .map(|c| c.to_digit(36).unwrap().to_string())
        .collect();
    let rem = numeric.chars().fold(0u64, |acc, c| {
        (acc * 10 + u64::from(c.to_digit(10).unwrap())) % 97
    });
    let compact = format!("{country}{:02}{bban}", 98 - rem);
    if rng.random_bool(0.5) {
        compact
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        compact
    }
}

fn sample(kind: Kind, rng: &mut StdRng) -> String {
    match kind {
        Kind::Email => format!(
            "{}{}{}@{}.{}",
            {
                let n = rng.random_range(2..10);
                alnum(rng, n).to_lowercase()
            },
            pick(rng, &["", ".", "_", "+"]),
            alnum(rng, 3).to_lowercase(),
            pick(rng, &["example", "mail.acme", "corp-x", "uni.ac"]),
            pick(rng, &["com", "io", "co.uk", "de", "org"])
        ),
        Kind::Phone => {
            let (a, b, c) = (digits(rng, 3), digits(rng, 3), digits(rng, 4));
            match rng.random_range(0..6) {
                0 => format!("+1 {a} {b} {c}"),
                1 => format!("({a}) {b}-{c}"),
                2 => format!("{a}-{b}-{c}"),
                3 => format!("{a}.{b}.{c}"),
                4 => format!("+44 20 {} {}", digits(rng, 4), digits(rng, 4)),
                _ => format!(
                    "+33 1 {} {} {} {}",
                    digits(rng, 2),
                    digits(rng, 2),
                    digits(rng, 2),
                    digits(rng, 2)
                ),
            }
        }
        Kind::Card => {
            let raw = match rng.random_range(0..3) {
                0 => luhn_complete(&format!("4{}", digits(rng, 14))),
                1 => luhn_complete(&format!("5{}", digits(rng, 14))),
                _ => luhn_complete(&format!("37{}", digits(rng, 12))),
            };
            let sep = pick(rng, &["", " ", "-"]);
            raw.as_bytes()
                .chunks(4)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(sep)
        }
        Kind::Iban => iban(rng),
        Kind::Ip => {
            if rng.random_bool(0.6) {
                format!(
                    "{}.{}.{}.{}",
                    rng.random_range(1..=255),
                    rng.random_range(0..=255),
                    rng.random_range(0..=255),
                    rng.random_range(1..=254)
                )
            } else if rng.random_bool(0.5) {
                (0..8)
                    .map(|_| format!("{:x}", rng.random_range(0..=0xffffu32)))
                    .collect::<Vec<_>>()
                    .join(":")
            } else {
                format!(
                    "2001:db8::{:x}:{:x}",
                    rng.random_range(1..=0xffffu32),
                    rng.random_range(1..=0xffffu32)
                )
            }
        }
        Kind::OpenaiKey => format!("sk-proj-{}", alnum(rng, 40)),
        Kind::AnthropicKey => format!("sk-ant-api03-{}", alnum(rng, 40)),
        Kind::AwsKey if rng.random_bool(0.3) => format!(
            "{}{}{}",
            pick(
                rng,
                &[
                    "aws_secret_access_key = \"",
                    "AWS_SECRET_ACCESS_KEY=",
                    "\"aws_secret_access_key\": \""
                ]
            ),
            alnum(rng, 40),
            pick(rng, &["\"", ""])
        ),
        Kind::AwsKey => format!("AKIA{}", alnum(rng, 16).to_uppercase()),
        Kind::GithubToken => format!("ghp_{}", alnum(rng, 36)),
        Kind::Jwt => format!(
            "eyJ{}.eyJ{}.{}",
            alnum(rng, 20),
            alnum(rng, 30),
            alnum(rng, 43)
        ),
        Kind::BearerToken => format!("Bearer {}", alnum(rng, 32)),
        Kind::BasicAuth => format!("Authorization: Basic {}=", alnum(rng, 23)),
        Kind::GoogleKey => format!("AIza{}", alnum(rng, 35)),
        Kind::SlackToken => format!("xoxb-{}-{}", digits(rng, 12), alnum(rng, 24)),
        Kind::Credential => format!(
            "{}: {}{}",
            pick(
                rng,
                &[
                    "api-key",
                    "password",
                    "client_secret",
                    "x-api-key",
                    "AZURE_OPENAI_API_KEY",
                    "DB_PASSWORD"
                ]
            ),
            digits(rng, 1),
            alnum(rng, 31).to_lowercase()
        ),
    }
}

fn clean_sentence(rng: &mut StdRng) -> String {
    let templates: [&dyn Fn(&mut StdRng) -> String; 14] = [
        &|r| {
            format!(
                "A basic understanding of {} helps; the password: {} it often.",
                pick(r, &["networking", "cryptography", "operating systems"]),
                pick(r, &["rotate", "change", "remember"])
            )
        },
        &|r| {
            format!(
                "Our risk-management-framework-overview covers {} vendors.",
                r.random_range(2..90)
            )
        },
        &|r| {
            format!(
                "The invoice total is ${}.{:02} due on 2024-{:02}-{:02}.",
                r.random_range(1..9999),
                r.random_range(0..100),
                r.random_range(1..13),
                r.random_range(1..29)
            )
        },
        &|r| {
            format!(
                "Upgrade to version {}.{}.{} before Friday.",
                r.random_range(0..20),
                r.random_range(0..50),
                r.random_range(0..100)
            )
        },
        &|r| {
            format!(
                "Order #{} shipped {} items to ZIP {}.",
                r.random_range(10_000..999_999),
                r.random_range(1..40),
                r.random_range(10_000..99_999)
            )
        },
        &|r| {
            format!(
                "The meeting is at {:02}:{:02} in room {}.",
                r.random_range(0..24),
                r.random_range(0..60),
                r.random_range(100..999)
            )
        },
        &|r| {
            format!(
                "We grew {}% year over year, to {} users.",
                r.random_range(1..300),
                r.random_range(1000..9_000_000)
            )
        },
        &|r| {
            format!(
                "Pi is about 3.{} and e about 2.{}.",
                r.random_range(1000..99999),
                r.random_range(1000..99999)
            )
        },
        &|r| {
            format!(
                "See section {}.{} on page {} of the manual.",
                r.random_range(1..30),
                r.random_range(1..20),
                r.random_range(1..900)
            )
        },
        &|r| {
            format!(
                "Ticket ORD-{}-{} was closed after {} days.",
                r.random_range(2019..2026),
                r.random_range(1000..9999),
                r.random_range(1..90)
            )
        },
        &|r| {
            format!(
                "Use the key named `{}` in the settings page.",
                pick(r, &["api_key", "secret_name", "token_id"])
            )
        },
        &|r| {
            format!(
                "The build took {} seconds on {} cores with {} GB of RAM.",
                r.random_range(10..999),
                r.random_range(1..64),
                r.random_range(1..512)
            )
        },
        &|r| {
            format!(
                "Call the function with n={} and k={}.",
                r.random_range(1..1000),
                r.random_range(1..100)
            )
        },
        &|r| {
            format!(
                "Request id {} failed at step {} of {}.",
                alnum(r, 12),
                r.random_range(1..10),
                r.random_range(10..20)
            )
        },
    ];
    let i = rng.random_range(0..templates.len());
    templates[i](rng)
}

#[test]
fn recall_and_false_positives_per_type() {
    let redactor = Redactor::default();
    let mut rng = StdRng::seed_from_u64(7);
    let mut report = Vec::new();
    for kind in Kind::ALL {
        let mut found = 0;
        for _ in 0..N {
            let value = sample(kind, &mut rng);
            let text = format!(
                "{} {value}{}",
                pick(&mut rng, &["Contact:", "My value is", "Use", "->"]),
                pick(&mut rng, &[".", ",", " thanks", ""])
            );
            let out = redactor.redact_str(&text).unwrap_or_else(|| text.clone());
            if !out.contains(&value) && out.contains(&format!("[REDACTED:{}]", kind.name())) {
                found += 1;
            }
        }
        let recall = found as f64 / N as f64;
        report.push(format!(
            "{:<14} recall {:>6.1}%",
            kind.name(),
            recall * 100.0
        ));
        assert!(
            recall >= 0.99,
            "{} recall {:.1}% < 99%\n{}",
            kind.name(),
            recall * 100.0,
            report.join("\n")
        );
    }
    let mut flagged = 0;
    for _ in 0..N {
        let text = clean_sentence(&mut rng);
        if redactor.redact_str(&text).is_some() {
            flagged += 1;
        }
    }
    let fp = flagged as f64 / N as f64;
    report.push(format!("clean text     false positives {:.1}%", fp * 100.0));
    println!("{}", report.join("\n"));
    assert!(fp <= 0.01, "false positives {:.1}%", fp * 100.0);
}
