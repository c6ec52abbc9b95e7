# Variables of the KM appliance image build (km.pkr.hcl). Set them with `-var name=value`
# or a `*.pkrvars.hcl` file given with `-var-file`; see README.md.

# ---------------------------------------------------------------------------------------
# Common to every source
# ---------------------------------------------------------------------------------------

variable "artifacts_dir" {
  type        = string
  default     = ""
  description = "Directory holding the package km_<version>_amd64.deb to install. Empty means target/deb at the repository root (where `packaging/build-deb.sh` writes it)."
}

variable "version" {
  type        = string
  default     = ""
  description = "Version recorded in the image description, tags/labels and the manifest. Empty means the workspace version in the repository's Cargo.toml."
}

variable "commit" {
  type        = string
  default     = ""
  description = "Source commit recorded in the image description, tags/labels and the manifest, e.g. the output of `git rev-parse --short HEAD`. Empty means \"unknown\"."
}

variable "manifest_output" {
  type        = string
  default     = ""
  description = "Path of the JSON manifest listing the images built (appended to on every build). Empty means packer/packer-manifest.json."
}

# ---------------------------------------------------------------------------------------
# amazon-ebs: an AMI built from Debian's official Debian 12 AMI
# ---------------------------------------------------------------------------------------

variable "aws_region" {
  type        = string
  default     = "us-east-1"
  description = "AWS region the build instance runs in and the AMI is registered in."
}

variable "aws_profile" {
  type        = string
  default     = ""
  description = "Named profile of ~/.aws/config and ~/.aws/credentials to use. Empty means the AWS SDK's default chain (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, SSO cache, instance role)."
}

variable "aws_instance_type" {
  type        = string
  default     = "t3.small"
  description = "Instance type of the temporary build instance (the image runs on any x86_64 type)."
}

variable "aws_volume_size" {
  type        = number
  default     = 16
  description = "Size in GiB of the image's root volume (gp3). Instances launched from the AMI may use a bigger one."
}

variable "aws_vpc_id" {
  type        = string
  default     = ""
  description = "VPC of the build instance. Empty means the region's default VPC (or the VPC of aws_subnet_id)."
}

variable "aws_subnet_id" {
  type        = string
  default     = ""
  description = "Subnet of the build instance. Empty lets AWS pick one in the VPC. Packer connects to the instance's public IP if it has one (as in default subnets), otherwise to its private IP (then run Packer inside the VPC or over a VPN)."
}

variable "aws_ssh_cidrs" {
  type        = list(string)
  default     = ["0.0.0.0/0"]
  description = "Addresses allowed to reach the build instance's SSH port through the temporary security group Packer creates, e.g. [\"203.0.113.7/32\"] for your own address only."
}

variable "aws_ami_regions" {
  type        = list(string)
  default     = []
  description = "Further regions to copy the finished AMI to, e.g. [\"eu-west-1\", \"us-west-2\"]."
}

variable "aws_encrypt_boot" {
  type        = bool
  default     = false
  description = "Encrypt the AMI's root snapshot (and its copies) with EBS encryption."
}

variable "aws_kms_key_id" {
  type        = string
  default     = ""
  description = "KMS key (ID, ARN or alias ARN) used when aws_encrypt_boot is true. Empty means the account's default aws/ebs key."
}

variable "aws_tags" {
  type        = map(string)
  default     = {}
  description = "Extra tags on the AMI and its snapshots, e.g. { Team = \"ops\" }. They override the default tags (Name, Application, Version, Commit) of the same name."
}

# ---------------------------------------------------------------------------------------
# googlecompute: a Compute Engine image built from the debian-12 image family
# ---------------------------------------------------------------------------------------

variable "gcp_project_id" {
  type        = string
  default     = ""
  description = "Google Cloud project the build instance runs in and the image is created in. Required for the googlecompute source."
}

variable "gcp_zone" {
  type        = string
  default     = "us-central1-a"
  description = "Zone of the temporary build instance."
}

variable "gcp_machine_type" {
  type        = string
  default     = "e2-small"
  description = "Machine type of the temporary build instance (the image runs on any x86_64 type)."
}

variable "gcp_disk_size" {
  type        = number
  default     = 16
  description = "Size in GB of the image's boot disk. Instances created from the image may use a bigger one."
}

variable "gcp_network" {
  type        = string
  default     = ""
  description = "VPC network of the build instance. Empty means the project's \"default\" network."
}

variable "gcp_subnetwork" {
  type        = string
  default     = ""
  description = "Subnetwork of the build instance; needed when gcp_network is a custom-mode network."
}

variable "gcp_use_os_login" {
  type        = bool
  default     = false
  description = "Log in to the build instance through OS Login (needed where the project or organisation enforces it) instead of an SSH key in the instance metadata."
}

variable "gcp_image_family" {
  type        = string
  default     = "km-appliance"
  description = "Image family the image is added to; instances created from the family get its newest image."
}

variable "gcp_labels" {
  type        = map(string)
  default     = {}
  description = "Extra labels on the image (lowercase keys and values). They override the default labels (application, version, commit) of the same name."
}

# ---------------------------------------------------------------------------------------
# null: installs the appliance on an existing Debian 12 (bookworm) host over SSH
# ---------------------------------------------------------------------------------------

variable "host_address" {
  type        = string
  default     = ""
  description = "Address (name or IP) of the existing Debian 12 host to install on. Required for the null source."
}

variable "host_ssh_port" {
  type        = number
  default     = 22
  description = "SSH port of the existing host."
}

variable "host_ssh_username" {
  type        = string
  default     = "admin"
  description = "SSH user on the existing host: root, or a user with passwordless sudo."
}

variable "host_ssh_private_key_file" {
  type        = string
  default     = ""
  description = "Private key file for SSH to the existing host. Empty means the keys of the running ssh-agent (SSH_AUTH_SOCK)."
}
