#!/usr/bin/env bash
# Build dist/fsrvpd_<version>-1_all.deb from the wheel in dist/ (`make deb` builds the wheel first).
#
# A plain dpkg-deb build, no debhelper: the Python package goes to /usr/lib/python3/dist-packages
# (byte-compiled by postinst with py3compile, as dh_python3 would arrange), small launchers to
# /usr/bin, the unit to /lib/systemd/system, the example configuration to /etc/fsrvpd/ and the
# monitoring files to /usr/share/fsrvpd/.  Run-time dependencies are Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
wheel=dist/fsrvpd-$version-py3-none-any.whl
[ -f "$wheel" ] || { echo "build-deb.sh: $wheel is missing (make dist)" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root

install -d "$root/usr/lib/python3/dist-packages" "$root/usr/bin" "$root/DEBIAN"
python3 -m zipfile -e "$wheel" "$root/usr/lib/python3/dist-packages"
for tool in fsrvpd:cli fsrvpctl:ctl; do
    printf '#!/usr/bin/python3\nimport sys\n\nfrom fsrvpd.%s import main\n\nsys.exit(main())\n' "${tool#*:}" \
        > "$root/usr/bin/${tool%%:*}"
    chmod 755 "$root/usr/bin/${tool%%:*}"
done
install -D -m 644 systemd/fsrvpd.service "$root/lib/systemd/system/fsrvpd.service"
install -D -m 644 etc/fsrvpd.example.yaml "$root/etc/fsrvpd/fsrvpd.example.yaml"
install -D -m 644 packaging/prometheus/fsrvpd-alerts.yml "$root/usr/share/fsrvpd/prometheus/fsrvpd-alerts.yml"
install -D -m 644 packaging/grafana/fsrvpd-dashboard.json "$root/usr/share/fsrvpd/grafana/fsrvpd-dashboard.json"
install -D -m 644 README.md "$root/usr/share/doc/fsrvpd/README.md"
install -D -m 644 packaging/debian/copyright "$root/usr/share/doc/fsrvpd/copyright"
for script in postinst prerm postrm; do
    install -m 755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
echo /etc/fsrvpd/fsrvpd.example.yaml > "$root/DEBIAN/conffiles"
installed_kib=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version-1/" -e "s/@INSTALLED_SIZE@/$installed_kib/" packaging/debian/control.in \
    > "$root/DEBIAN/control"
find "$root" -type d -exec chmod 755 {} +
find "$root/usr/lib" "$root/usr/share" "$root/etc" -type f -exec chmod 644 {} +
dpkg-deb --root-owner-group -Zxz --build "$root" "dist/fsrvpd_${version}-1_all.deb" >/dev/null
echo "dist/fsrvpd_${version}-1_all.deb"
