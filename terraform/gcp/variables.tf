# ---------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------

variable "project" {
  description = "Project the appliance runs in; the image family is looked up there too when image is null."
  type        = string
}

variable "zone" {
  description = "Zone of the instance, such as europe-west1-b; the static address is reserved in its region."
  type        = string

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+-[a-z]$", var.zone))
    error_message = "zone: a zone name such as europe-west1-b."
  }
}

variable "name" {
  description = "Name of the instance and prefix of its address, firewall rules and network tag (lowercase letters, digits, '-')."
  type        = string
  default     = "km"

  validation {
    condition     = can(regex("^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$", var.name))
    error_message = "name: 1 to 40 lowercase letters, digits or '-', starting with a letter and not ending with '-'."
  }
}

variable "machine_type" {
  description = "Machine type. The embedded datastores want at least 8 GiB of memory; with external MongoDB, Elasticsearch and Redis a smaller type will do."
  type        = string
  default     = "e2-standard-2"
}

variable "image" {
  description = "Image of the KM appliance (name, family URL or self link). Null: the newest image of image_family in var.project."
  type        = string
  default     = null
}

variable "image_family" {
  description = "Image family searched in var.project when image is null (Packer's km-appliance-* images are in it)."
  type        = string
  default     = "km-appliance"
}

variable "boot_disk_size_gb" {
  description = "Size of the boot disk in GB (at least the image's). It holds the embedded datastores."
  type        = number
  default     = 40

  validation {
    condition     = var.boot_disk_size_gb >= 10 && floor(var.boot_disk_size_gb) == var.boot_disk_size_gb
    error_message = "boot_disk_size_gb: a whole number of GB, at least 10."
  }
}

variable "boot_disk_type" {
  description = "Boot disk type."
  type        = string
  default     = "pd-balanced"

  validation {
    condition     = contains(["pd-standard", "pd-balanced", "pd-ssd", "pd-extreme", "hyperdisk-balanced"], var.boot_disk_type)
    error_message = "boot_disk_type: pd-standard, pd-balanced, pd-ssd, pd-extreme or hyperdisk-balanced."
  }
}

variable "boot_disk_kms_key_self_link" {
  description = "Cloud KMS key encrypting the boot disk (CMEK). Null: Google-managed encryption."
  type        = string
  default     = null
}

variable "network" {
  description = "VPC network of the instance; the firewall rules are created in it."
  type        = string
  default     = "default"
}

variable "subnetwork" {
  description = "Subnetwork of the instance (needed for custom-mode networks). Null: the network's subnet in the zone's region."
  type        = string
  default     = null
}

variable "ipv6" {
  description = "Give the instance an external IPv6 address too (the subnetwork must be dual-stack with external IPv6). The firewall already admits HTTP and HTTPS over IPv6."
  type        = bool
  default     = false
}

variable "ssh_cidrs" {
  description = "IPv4 and IPv6 ranges allowed to reach SSH (22). Empty: no SSH rule at all. Ranges of the whole internet (/0) are refused."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.ssh_cidrs : can(cidrhost(c, 0))])
    error_message = "ssh_cidrs: every entry must be a CIDR range such as 203.0.113.0/24 or 2001:db8::/48."
  }

  validation {
    condition     = length([for c in var.ssh_cidrs : c if endswith(c, "/0")]) == 0
    error_message = "ssh_cidrs: SSH is not opened to the whole internet; list the administrators' ranges."
  }
}

variable "enable_oslogin" {
  description = "SSH through OS Login (IAM-controlled accounts) rather than metadata keys; project-wide keys are blocked either way."
  type        = bool
  default     = true
}

variable "serial_port_enable" {
  description = "Allow interactive access to the serial console. Not needed to read the setup URL: the serial port output (gcloud compute instances get-serial-port-output) is readable without it."
  type        = bool
  default     = false
}

variable "secure_boot" {
  description = "Shielded VM Secure Boot (the image must be UEFI-compatible and signed; vTPM and integrity monitoring are always on)."
  type        = bool
  default     = true
}

variable "service_account_email" {
  description = "Service account of the instance. Null: the project's default compute account, limited by service_account_scopes. A dedicated account holding only roles/logging.logWriter and roles/monitoring.metricWriter is better."
  type        = string
  default     = null
}

variable "service_account_scopes" {
  description = "OAuth scopes of the instance's service account. The appliance calls no Google API: the default allows only writing logs and metrics."
  type        = list(string)
  default = [
    "https://www.googleapis.com/auth/logging.write",
    "https://www.googleapis.com/auth/monitoring.write",
  ]
}

variable "deletion_protection" {
  description = "Protect the instance against deletion. Its boot disk holds the embedded datastores."
  type        = bool
  default     = false
}

variable "labels" {
  description = "Labels added to the instance, its disk and its address."
  type        = map(string)
  default     = {}
}

variable "network_tags" {
  description = "Network tags added to the instance besides the one the firewall rules target."
  type        = list(string)
  default     = []
}

# ---------------------------------------------------------------------------------------
# The appliance's settings (applied once, at first boot, when licence is set)
# ---------------------------------------------------------------------------------------

variable "licence" {
  description = "KM licence (KM_DEDICATED_KEY). Set: the settings below are applied headless at first boot. Null or empty: nothing is applied and the setup wizard waits for an operator."
  type        = string
  default     = null
  sensitive   = true
}

variable "site_url" {
  description = "KM_SITE_URL: the address people and agents use, such as https://km.example.com. Null: unset (the appliance answers on its IP address)."
  type        = string
  default     = null

  validation {
    condition     = var.site_url == null || can(regex("^https?://[^/\\s]+", var.site_url))
    error_message = "site_url: an http:// or https:// URL such as https://km.example.com."
  }
}

variable "mongo_url" {
  description = "KM_MONGO_URL: an external MongoDB (mongodb:// or mongodb+srv://). Null: the embedded store."
  type        = string
  default     = null
  sensitive   = true
}

variable "elasticsearch_url" {
  description = "KM_ELASTICSEARCH_URL: external Elasticsearch / OpenSearch (http(s)://host:port, several separated by spaces). Null: the embedded store."
  type        = string
  default     = null
  sensitive   = true
}

variable "redis_url" {
  description = "KM_REDIS_URL: an external Redis (redis:// or rediss://). Null: the embedded store."
  type        = string
  default     = null
  sensitive   = true
}

variable "smtp_host" {
  description = "SMTP_HOST: mail server for notifications, host or host:port. Null: no mail."
  type        = string
  default     = null
}

variable "smtp_port" {
  description = "SMTP_PORT. Null: the appliance's default for smtp_tls (465 tls, 587 starttls, 25 none)."
  type        = number
  default     = null

  validation {
    condition     = var.smtp_port == null || try(var.smtp_port >= 1 && var.smtp_port <= 65535 && floor(var.smtp_port) == var.smtp_port, false)
    error_message = "smtp_port: a port number from 1 to 65535."
  }
}

variable "smtp_user" {
  description = "SMTP_USER: SMTP login."
  type        = string
  default     = null
}

variable "smtp_password" {
  description = "SMTP_PASSWORD: SMTP password."
  type        = string
  default     = null
  sensitive   = true
}

variable "smtp_sender" {
  description = "SMTP_SENDER: the From address of notifications."
  type        = string
  default     = null
}

variable "smtp_tls" {
  description = "SMTP_TLS: none, starttls or tls. Null: the appliance's default (starttls)."
  type        = string
  default     = null

  validation {
    condition     = var.smtp_tls == null || contains(["none", "starttls", "tls"], coalesce(var.smtp_tls, "-"))
    error_message = "smtp_tls: none, starttls or tls."
  }
}

variable "km_tls" {
  description = "KM_TLS: off (plain HTTP), acme (a certificate for site_url's host, validated over HTTP-01 on port 80) or files (KM_TLS_CERT and KM_TLS_KEY, through extra_settings). Null: the appliance's default (off)."
  type        = string
  default     = null

  validation {
    condition     = var.km_tls == null || contains(["off", "files", "acme"], coalesce(var.km_tls, "-"))
    error_message = "km_tls: off, files or acme."
  }
}

variable "acme_email" {
  description = "KM_ACME_EMAIL: contact address given to the ACME CA (km_tls = acme)."
  type        = string
  default     = null

  validation {
    condition     = var.acme_email == null || can(regex("^[^@\\s]+@[^@\\s]+$", var.acme_email))
    error_message = "acme_email: an email address."
  }
}

variable "retention_days" {
  description = "KM_RETENTION_DAYS: days of events (metrics, logs, exceptions) kept. Null: the appliance's default (30)."
  type        = number
  default     = null

  validation {
    condition     = var.retention_days == null || try(var.retention_days > 0 && floor(var.retention_days) == var.retention_days, false)
    error_message = "retention_days: a whole number of days, greater than 0."
  }
}

variable "extra_settings" {
  description = "Other appliance settings written with the ones above (not those this module has inputs for), such as KM_TLS_CERT, KM_TLS_KEY, KM_ALLOW_SIGNUP or WIZARD_TEST_MAIL_TO."
  type        = map(string)
  default     = {}
  sensitive   = true

  validation {
    condition     = alltrue([for k in keys(var.extra_settings) : can(regex("^[A-Za-z_][A-Za-z0-9_]*$", k))])
    error_message = "extra_settings: names are letters, digits and '_', not starting with a digit."
  }

  validation {
    condition = length(setintersection(keys(var.extra_settings), [
      "KM_DEDICATED_KEY", "KM_SITE_URL", "KM_MONGO_URL", "KM_ELASTICSEARCH_URL", "KM_REDIS_URL",
      "SMTP_HOST", "SMTP_PORT", "SMTP_USER", "SMTP_PASSWORD", "SMTP_SENDER", "SMTP_TLS",
      "KM_TLS", "KM_ACME_EMAIL", "KM_RETENTION_DAYS",
      "WIZARD_ADMIN_USERNAME", "WIZARD_ADMIN_EMAIL", "WIZARD_ADMIN_PASSWORD",
    ])) == 0
    error_message = "extra_settings: the settings this module has inputs for are set through those inputs."
  }
}

variable "admin_username" {
  description = "WIZARD_ADMIN_USERNAME: the first admin account, created by the headless setup (required with licence)."
  type        = string
  default     = null
}

variable "admin_email" {
  description = "WIZARD_ADMIN_EMAIL: the first admin's email address (required with licence)."
  type        = string
  default     = null

  validation {
    condition     = var.admin_email == null || can(regex("^[^@\\s]+@[^@\\s]+$", var.admin_email))
    error_message = "admin_email: an email address."
  }
}

variable "admin_password" {
  description = "WIZARD_ADMIN_PASSWORD: the first admin's password, at least 8 characters (required with licence). Change it in the dashboard after the first sign-in."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.admin_password == null || try(length(var.admin_password) >= 8, false)
    error_message = "admin_password: at least 8 characters."
  }
}
