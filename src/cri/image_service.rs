//! CRI ImageService: translates requests onto `image::ImageStore`.

use std::collections::HashMap;
use std::time::SystemTime;

use base64::Engine;
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::*;
use tonic::{Request, Response, Status};

use super::{CriService, traced};
use crate::image::metadata::ImageRecord;
use crate::image::registry::RegistryError;
use crate::image::{Credentials, ImageError};

type Reply<T> = Result<Response<T>, Status>;

fn image_name(spec: Option<&ImageSpec>) -> String {
    spec.map(|s| s.image.clone()).unwrap_or_default()
}

fn require_name(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("no image named in the request"));
    }
    Ok(())
}

#[tonic::async_trait]
impl ImageService for CriService {
    async fn list_images(&self, req: Request<ListImagesRequest>) -> Reply<ListImagesResponse> {
        let filter = image_name(req.get_ref().filter.as_ref().and_then(|f| f.image.as_ref()));
        traced("ListImages", &filter, async {
            let images = if filter.is_empty() {
                self.images.list()
            } else {
                self.images
                    .find(&filter)
                    .map_err(image_status)?
                    .into_iter()
                    .collect()
            };
            Ok(Response::new(ListImagesResponse {
                images: images.iter().map(to_cri_image).collect(),
            }))
        })
        .await
    }

    async fn image_status(&self, req: Request<ImageStatusRequest>) -> Reply<ImageStatusResponse> {
        let name = image_name(req.get_ref().image.as_ref());
        let verbose = req.get_ref().verbose;
        traced("ImageStatus", &name, async {
            require_name(&name)?;
            // Unknown is OK with no image: kubelet pulls on that answer.
            let Some(image) = self.images.find(&name).map_err(image_status)? else {
                return Ok(Response::new(ImageStatusResponse::default()));
            };
            let info = if verbose {
                self.image_info(&image)?
            } else {
                HashMap::new()
            };
            Ok(Response::new(ImageStatusResponse {
                image: Some(to_cri_image(&image)),
                info,
            }))
        })
        .await
    }

    async fn pull_image(&self, req: Request<PullImageRequest>) -> Reply<PullImageResponse> {
        let req = req.into_inner();
        let name = image_name(req.image.as_ref());
        traced("PullImage", &name, async {
            require_name(&name)?;
            let credentials = req.auth.as_ref().map(credentials).transpose()?;
            let image = self
                .images
                .pull(&name, credentials)
                .await
                .map_err(image_status)?;
            Ok(Response::new(PullImageResponse {
                image_ref: image.id.to_string(),
            }))
        })
        .await
    }

    async fn remove_image(&self, req: Request<RemoveImageRequest>) -> Reply<RemoveImageResponse> {
        let name = image_name(req.get_ref().image.as_ref());
        traced("RemoveImage", &name, async {
            require_name(&name)?;
            self.images.remove(&name).await.map_err(image_status)?;
            Ok(Response::new(RemoveImageResponse {}))
        })
        .await
    }

    async fn image_fs_info(&self, _req: Request<ImageFsInfoRequest>) -> Reply<ImageFsInfoResponse> {
        traced("ImageFsInfo", "", async {
            let images = self.images.clone();
            let layers = self.config.root.join("containers");
            let (usage, writable) = tokio::task::spawn_blocking(move || {
                (images.disk_usage(), crate::image::disk_usage_of(&layers))
            })
            .await
            .map_err(|e| Status::internal(format!("disk usage walk failed: {e}")))?;
            let timestamp = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or_default();
            Ok(Response::new(ImageFsInfoResponse {
                image_filesystems: vec![FilesystemUsage {
                    timestamp,
                    fs_id: Some(FilesystemIdentifier {
                        mountpoint: self.images.mountpoint().display().to_string(),
                    }),
                    used_bytes: Some(UInt64Value { value: usage.bytes }),
                    inodes_used: Some(UInt64Value {
                        value: usage.inodes,
                    }),
                }],
                // The containers' writable layers, on the same filesystem.
                container_filesystems: vec![FilesystemUsage {
                    timestamp,
                    fs_id: Some(FilesystemIdentifier {
                        mountpoint: self.config.root.join("containers").display().to_string(),
                    }),
                    used_bytes: Some(UInt64Value {
                        value: writable.bytes,
                    }),
                    inodes_used: Some(UInt64Value {
                        value: writable.inodes,
                    }),
                }],
            }))
        })
        .await
    }
}

impl CriService {
    /// Verbose image info: the image config as JSON, plus ids tools look for.
    fn image_info(&self, image: &ImageRecord) -> Result<HashMap<String, String>, Status> {
        let config = self.images.config_json(image).map_err(image_status)?;
        let spec: serde_json::Value = serde_json::from_slice(&config)
            .map_err(|e| Status::internal(format!("stored image config is not JSON: {e}")))?;
        let info = serde_json::json!({
            "id": image.id.to_string(),
            "chainID": image.layers.last().map(|l| l.chain_id.to_string()),
            "imageSpec": spec,
        });
        Ok(HashMap::from([("info".to_string(), info.to_string())]))
    }
}

fn to_cri_image(image: &ImageRecord) -> Image {
    let (uid, username) = image_user(&image.config.user);
    Image {
        id: image.id.to_string(),
        repo_tags: image.repo_tags.iter().cloned().collect(),
        repo_digests: image.repo_digests.iter().cloned().collect(),
        size: image.size,
        uid: uid.map(|value| Int64Value { value }),
        username,
        spec: Some(ImageSpec {
            image: image.id.to_string(),
            ..Default::default()
        }),
        pinned: image.pinned,
    }
}

/// The image's USER as CRI reports it: a numeric user (`1002`, `1002:1002`)
/// is a uid, anything else a username.
fn image_user(user: &str) -> (Option<i64>, String) {
    let name = user.split(':').next().unwrap_or_default();
    if name.is_empty() {
        return (None, String::new());
    }
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

fn credentials(auth: &AuthConfig) -> Result<Credentials, Status> {
    let (mut username, mut password) = (auth.username.clone(), auth.password.clone());
    if username.is_empty() && !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|e| Status::invalid_argument(format!("auth is not base64: {e}")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| Status::invalid_argument("auth is not UTF-8 user:password"))?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| Status::invalid_argument("auth is not of the form user:password"))?;
        (username, password) = (u.to_string(), p.to_string());
    }
    let token = if auth.registry_token.is_empty() {
        auth.identity_token.clone()
    } else {
        auth.registry_token.clone()
    };
    Ok(Credentials {
        username,
        password,
        token,
    })
}

/// The gRPC status for an image error.
fn image_status(e: impl std::borrow::Borrow<ImageError>) -> Status {
    let e = e.borrow();
    let message = e.to_string();
    match e {
        ImageError::Reference(_) => Status::invalid_argument(message),
        ImageError::Registry { source, .. } => match source {
            RegistryError::Unauthenticated { .. } => Status::unauthenticated(message),
            RegistryError::Denied { .. } => Status::permission_denied(message),
            RegistryError::NotFound { .. } => Status::not_found(message),
            RegistryError::Stalled { .. } => Status::deadline_exceeded(message),
            RegistryError::NoEndpoint(_) | RegistryError::Tls { .. } => {
                Status::failed_precondition(message)
            }
            _ => Status::unavailable(message),
        },
        ImageError::Manifest { .. } | ImageError::Unpack { .. } | ImageError::DiffId { .. } => {
            Status::failed_precondition(message)
        }
        ImageError::InUse { .. } => Status::failed_precondition(message),
        _ => Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_users_are_uids_and_names_are_usernames() {
        assert_eq!(image_user("1002"), (Some(1002), String::new()));
        assert_eq!(image_user("1003:1003"), (Some(1003), String::new()));
        assert_eq!(image_user("www-data"), (None, "www-data".to_string()));
        assert_eq!(image_user("www-data:group"), (None, "www-data".to_string()));
        assert_eq!(image_user(""), (None, String::new()));
    }

    #[test]
    fn auth_field_is_decoded() {
        let auth = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("u:p:w"),
            ..Default::default()
        };
        let c = credentials(&auth).expect("decodes");
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p:w"));
        let bad = AuthConfig {
            auth: "%%%".into(),
            ..Default::default()
        };
        assert_eq!(
            credentials(&bad).expect_err("bad").code(),
            tonic::Code::InvalidArgument
        );
    }
}
