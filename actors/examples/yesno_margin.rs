//! Diagnostic: how well a checkpoint separates the yes and no questions of a RobustVQA / POPE file,
//! threshold-free. For each question, margin = log p(" Yes</s>") − log p(" No</s>"); prints per split
//! the AUC of the margin (0.5 = no signal), the mean margins of yes- and no-labelled questions, and
//! the accuracy at the best threshold. A question whose image is "" is asked as text only.
//!
//! cargo run --release -p deem-actors --example yesno_margin -- CONFIG CHECKPOINT DATA FILE...

use std::path::Path;
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 4 {
        anyhow::bail!("usage: yesno_margin CONFIG CHECKPOINT DATA FILE...");
    }
    let cfg: deem::config::DeemConfig = toml::from_str(&std::fs::read_to_string(&a[0])?)?;
    let data = Path::new(&a[2]);
    let tok = Arc::new(deem::text::tokenizer::load_tokenizer(
        None,
        Some(data),
        &cfg,
    )?);
    let clf = deem_actors::cli::report::ModelClassifier::new(&cfg, Path::new(&a[1]), tok.clone())?;
    let eos = cfg.llm.eos_token_id;
    let replies = [
        deem_actors::cli::report::reply_ids(&tok, " Yes", eos)?,
        deem_actors::cli::report::reply_ids(&tok, " No", eos)?,
    ];
    for f in &a[3..] {
        let f = Path::new(f);
        let splits: Vec<(String, Vec<deem::eval::Question>)> =
            if f.extension().is_some_and(|e| e == "jsonl") {
                vec![(
                    f.display().to_string(),
                    deem::eval::read_pope(f).map_err(anyhow::Error::msg)?,
                )]
            } else {
                deem::eval::read_robustvqa(f)
                    .map_err(anyhow::Error::msg)?
                    .into_iter()
                    .collect()
            };
        let base = f.parent().unwrap();
        for (name, qs) in splits {
            let mut m: Vec<(f64, bool)> = Vec::new();
            for q in &qs {
                // An empty image path: a text-only question.
                let image = (!q.image.is_empty()).then(|| base.join(&q.image));
                let s = clf.reply_scores(image.as_deref(), &q.text, &replies)?;
                m.push((s[0] - s[1], q.label == "yes"));
            }
            let pos: Vec<&(f64, bool)> = m.iter().filter(|x| x.1).collect();
            let neg: Vec<&(f64, bool)> = m.iter().filter(|x| !x.1).collect();
            let mut auc = 0.0;
            for p in &pos {
                for n in &neg {
                    auc += if p.0 > n.0 {
                        1.0
                    } else if p.0 == n.0 {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
            auc /= (pos.len() * neg.len()).max(1) as f64;
            let mean =
                |v: &[&(f64, bool)]| v.iter().map(|x| x.0).sum::<f64>() / v.len().max(1) as f64;
            let mut best = 0.0f64;
            for t in &m {
                let acc = m.iter().filter(|x| (x.0 >= t.0) == x.1).count() as f64 / m.len() as f64;
                best = best.max(acc);
            }
            println!(
                "{name}: n {} AUC {auc:.3} mean margin yes {:.3} no {:.3} best-threshold acc {best:.3}",
                m.len(),
                mean(&pos),
                mean(&neg)
            );
        }
    }
    Ok(())
}
