//! `cert-issuance`: service certificates issued by Tresor through the certificate manager.

use std::time::{Duration, Instant};

use anyhow::Result;

pub(crate) async fn cert_issuance(count: usize) -> Result<()> {
    let provider = fsm_certs::tresor::TresorProvider::generate()?;
    let certs = fsm_certs::CertManager::new(std::sync::Arc::new(provider), Default::default());
    let validity = Duration::from_secs(24 * 3600);
    let mut micros = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        certs
            .issue_service_certificate(&format!("sa-{i}"), "bench", "cluster.local", validity)
            .await?;
        micros.push(t.elapsed().as_micros() as u64);
    }
    let total = started.elapsed();
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "cert-issuance: {count} Tresor service certificates (P-256 key + signature) in {:.2} s: median {} us, p99 {} us, max {} us per certificate",
        total.as_secs_f64(),
        at(0.5),
        at(0.99),
        micros.last().copied().unwrap_or(0)
    );
    Ok(())
}
