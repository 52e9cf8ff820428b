//! Where the model file comes from: a local path (the air-gapped way) or a Hugging Face
//! reference `hf:OWNER/REPO/FILE`, fetched with hf-hub into its cache.

use std::path::PathBuf;

use super::EngineError;

/// A model location as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Path(PathBuf),
    Hub { repo: String, file: String },
}

const HOW_TO_SUPPLY: &str =
    "copy the .gguf file to this machine and pass its path with --model (or CONFAB_MODEL); \
     for the default model run ./models/fetch";

impl ModelSource {
    pub fn parse(s: &str) -> Result<ModelSource, EngineError> {
        match s.strip_prefix("hf:") {
            None => Ok(ModelSource::Path(PathBuf::from(s))),
            Some(rest) => {
                let mut parts = rest.splitn(3, '/');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(owner), Some(name), Some(file))
                        if !owner.is_empty() && !name.is_empty() && !file.is_empty() =>
                    {
                        Ok(ModelSource::Hub {
                            repo: format!("{owner}/{name}"),
                            file: file.to_string(),
                        })
                    }
                    _ => Err(EngineError::Source(format!(
                        "{s:?} is not a Hugging Face reference; use hf:OWNER/REPO/FILE.gguf"
                    ))),
                }
            }
        }
    }

    /// A local file for this source, downloading it first when it is on the Hub and not yet
    /// in the cache. Offline (`HF_HUB_OFFLINE=1`) only the cache is consulted.
    pub fn resolve(&self) -> Result<PathBuf, EngineError> {
        match self {
            ModelSource::Path(p) => {
                if p.is_file() {
                    Ok(p.clone())
                } else {
                    Err(EngineError::Source(format!(
                        "{} does not exist; {HOW_TO_SUPPLY}",
                        p.display()
                    )))
                }
            }
            ModelSource::Hub { repo, file } => {
                let cache = hf_hub::Cache::from_env();
                if let Some(p) = cache.model(repo.clone()).get(file) {
                    return Ok(p);
                }
                if offline() {
                    return Err(EngineError::Source(format!(
                        "hf:{repo}/{file} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set; {HOW_TO_SUPPLY}",
                        cache.path().display()
                    )));
                }
                let api = hf_hub::api::sync::ApiBuilder::from_env()
                    .with_progress(true)
                    .build()
                    .map_err(|e| {
                        EngineError::Source(format!("cannot set up the Hugging Face client: {e}"))
                    })?;
                api.model(repo.clone()).get(file).map_err(|e| {
                    EngineError::Source(format!("cannot download hf:{repo}/{file}: {e}; without network access, {HOW_TO_SUPPLY}"))
                })
            }
        }
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            ModelSource::parse("models/x.gguf").unwrap(),
            ModelSource::Path("models/x.gguf".into())
        );
        assert_eq!(
            ModelSource::parse("hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2.gguf").unwrap(),
            ModelSource::Hub {
                repo: "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF".into(),
                file: "smollm2.gguf".into()
            }
        );
        assert!(ModelSource::parse("hf:only-owner").is_err());
        assert!(ModelSource::parse("hf:a//f").is_err());
    }

    #[test]
    fn missing_path_says_how_to_supply_it() {
        let e = ModelSource::Path("/nonexistent/m.gguf".into())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--model") && e.contains("models/fetch"), "{e}");
    }
}
