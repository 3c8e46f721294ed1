# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
