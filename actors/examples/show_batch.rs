//! Diagnostic: prints the first rows of a training batch of DATA for CONFIG, target ids in [brackets].
//! cargo run --release -p deem-actors --example show_batch -- CONFIG DATA [INDEX]

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 2 {
        anyhow::bail!("usage: show_batch CONFIG DATA [INDEX]");
    }
    let cfg: deem::config::DeemConfig = toml::from_str(&std::fs::read_to_string(&a[0])?)?;
    let dir = std::path::Path::new(&a[1]);
    let index: u64 = a.get(2).map_or(Ok(0), |x| x.parse())?;
    let m = deem_actors::cli::train_data::dataset_batches(
        &cfg,
        dir,
        &deem_actors::runtime::metrics::Metrics::new(),
    )?;
    let tok = deem::text::tokenizer::load_tokenizer(None, Some(dir), &cfg)?;
    let b = m.batch(index).map_err(anyhow::Error::msg)?;
    let ids: Vec<Vec<i64>> = Vec::try_from(&b.input_ids)?;
    // Without a loss mask (stage I) every id is a target under ntp_loss's own rules.
    let mask: Vec<Vec<bool>> = match &b.loss_mask {
        Some(m) => Vec::try_from(&m.to_kind(tch::Kind::Bool))?,
        None => ids.iter().map(|r| vec![true; r.len()]).collect(),
    };
    let s = deem::models::deem::special_ids(&cfg);
    for (row, m) in ids.iter().zip(&mask).take(2) {
        let mut out = String::new();
        for (&t, &k) in row.iter().zip(m) {
            if t == s.sniffer || t == s.pad {
                continue;
            }
            let w = if t == s.soi {
                "<IMG>".to_string()
            } else {
                tok.decode(&[t as u32], false)?
            };
            out.push_str(&if k { format!("[{w}]") } else { w });
        }
        println!("{out}\n---");
    }
    Ok(())
}
